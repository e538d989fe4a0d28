"""Activities: one module per outside system. Every one is idempotent by its ``key``."""
