"""Adapters that let other libraries use the hook engine (optional dependencies)."""
