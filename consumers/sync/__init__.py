"""Configuration sync between environments (`cdc sync`): a scope of a source database replaces the same scope at a
destination, backed up first, in one destination transaction, with a history (docs/sync.md)."""
