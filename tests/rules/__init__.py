"""Tests of the layer rules: built-in rules, property-based checks, the generic rule and check_rule."""
