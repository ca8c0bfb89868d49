"""Options of the engine: memory against speed, accumulation over backward passes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """Options of :func:`~secorder_hooks.extend`.

    Attributes:
        column_chunk_size: Curvature quantities backpropagate ``V`` columns per example
            (``C - 1`` loss-Hessian square-root columns for a ``C``-class softmax output,
            ``C`` for ``C`` regression outputs, one column per activation element for
            Hessian residuals). Peak memory grows linearly with the number of columns
            processed at once; this bounds it, at the price of one vectorized backward per
            chunk. ``None`` chooses: the loss-Hessian columns go
            all at once, or one at a time when the recorded layer outputs exceed
            :data:`~secorder_hooks.engine.curvature.SINGLE_COLUMN_BYTES` per column (then a
            loop is faster and lighter); residual columns go all at once.
        accumulate: Whether the quantities accumulate over backward passes as ``.grad``
            does, until ``.grad`` is reset (see :doc:`/conventions`). ``False``: each
            backward pass overwrites the quantities it computes with its own values,
            whatever ``.grad`` holds.
    """

    column_chunk_size: int | None = None
    accumulate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.accumulate, bool):
            raise TypeError(f"accumulate must be True or False, got {self.accumulate!r}.")
        if self.column_chunk_size is not None and (
            not isinstance(self.column_chunk_size, int) or self.column_chunk_size < 1
        ):
            raise ValueError(f"column_chunk_size must be a positive int or None, got {self.column_chunk_size!r}.")
