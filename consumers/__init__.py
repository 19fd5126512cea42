"""Consumers: apply/ (applying changes), lag/ (measuring it), ops/ (replay, backups, verify, resync, query), and
the products built on them: sync/ and sites/."""
