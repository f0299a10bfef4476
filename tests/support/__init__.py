"""Helpers the tests share, each once: imported by test files and conftest.py files."""
