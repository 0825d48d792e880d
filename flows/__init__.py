"""Prefect flows: wiring only (no ML code)."""
