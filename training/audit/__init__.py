"""Auditor-facing tools over a run directory: verify, init-check, compare (lineage), report."""
