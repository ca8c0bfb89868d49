"""Tests of the engine: ``extend()``, the quantities on the model zoo, accumulation,
synchronization, Kronecker factors, and (in ``hard_cases``) the patterns users write."""
