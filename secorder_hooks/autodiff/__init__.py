"""Helpers on top of ``torch.autograd`` alone: graph traversals and batched vector-Jacobian products.

The lowest layer above :mod:`secorder_hooks.errors`: the losses, the rules, the engine and
the function API all use it, and it uses none of them.
"""
