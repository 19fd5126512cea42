"""Apply: event decoding, transaction assembly, the replica applier, the analytics replica, replay, lag, verify."""
