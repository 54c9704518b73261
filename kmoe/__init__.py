"""kmoe: the CLI and the small utilities every stage shares (hashing, typed config trees)."""

__version__ = "0.1.0"
