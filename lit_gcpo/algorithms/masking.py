"""Masked token statistics and the shape check shared by the loss functions (``losses``, ``rollout_correction``).

Conventions: ``mask`` is 1 on completion tokens and 0 on padding, ``[N, L]`` like the tensors it masks.
"""

from __future__ import annotations

from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum(x * mask) / max(sum(mask), 1)``: the mean over mask tokens, 0 when there are none."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def check_token_shapes(tensors: dict[str, Tensor], advantages: Tensor | None = None) -> None:
    """Raise unless every tensor of ``tensors`` (by name) has one ``[N, L]`` shape and ``advantages`` is ``[N]``."""
    shapes = [tuple(t.shape) for t in tensors.values()]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"{', '.join(tensors)} must share one [N, L] shape, got {', '.join(map(str, shapes))}")
    if advantages is not None and tuple(advantages.shape) != shapes[0][:1]:
        raise ValueError(f"advantages must be [N] = [{shapes[0][0]}], got {tuple(advantages.shape)}")
