"""The `cdc` command line: every command, its options and all output formatting (the library returns data)."""
