"""Tests of the documented function API."""
