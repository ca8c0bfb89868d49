"""Losses: recognition of standard loss calls and their Hessian square roots."""
