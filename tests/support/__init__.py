"""Helpers shared by test suites (importable as ``tests.support``; conftest files are not)."""
