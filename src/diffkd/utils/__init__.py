"""Small helpers for the entry points (loggers, config handling)."""
