"""Spark pipeline tests (share the expensive fixtures in conftest.py)."""
