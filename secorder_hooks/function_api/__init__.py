"""The function API's shared layer: one implementation behind the public function modules.

:mod:`secorder_hooks.core.hessian_diagonal`, :mod:`secorder_hooks.core.per_layer_curvature`,
:mod:`secorder_hooks.approximations.fisher_diagonal` and
:mod:`secorder_hooks.approximations.fisher_trace` are thin public modules over it. It uses
the engine (:mod:`~secorder_hooks.function_api.engine_pass`) where the engine applies and
exact vectorized autograd (:mod:`~secorder_hooks.function_api.vector_products`,
:mod:`~secorder_hooks.function_api.hessian`) otherwise, the choice made in one place,
:func:`~secorder_hooks.function_api.backend.engine_or_autograd`.
"""
