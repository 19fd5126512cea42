"""Operations on a destination besides applying: replay, backups, verify and re-sync, and read-only queries."""
