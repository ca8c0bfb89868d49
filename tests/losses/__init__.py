"""Tests of the loss layer: recognition of loss calls, terms, reduction factors, target checks."""
