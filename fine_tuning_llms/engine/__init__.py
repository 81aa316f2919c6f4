"""The engine: everything the lessons share. Imports no lesson (tests/test_layout.py checks)."""
