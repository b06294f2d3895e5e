"""Local-only helpers for running arks-ray on one machine without a model hub (tests, demo, CI)."""
