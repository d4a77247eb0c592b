"""One optimizer step that never writes non-finite weights, decided identically on every rank.

The gradient norm is the global one (DDP's reduced gradients are the same everywhere; FSDP2's gradients are
DTensor shards whose norm is reduced over the mesh), and a non-finite loss on any rank skips the step on
every rank: a rank-local decision would let the others step alone, and the skipping rank would then wait
forever in the next collective. Skips are counted; after ``max_consecutive_skips`` in a row the run stops
with an error (``max_steps`` would otherwise never be reached).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

log = logging.getLogger(__name__)


def global_grad_norm(grads: list[torch.Tensor], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients of the model: replicated gradients (one device, DDP after its all-reduce)
    are whole on every rank; FSDP2's are DTensor shards, each element on one rank, whose squares are summed
    over ranks. Computed in float32."""
    sharded = [hasattr(g, "to_local") for g in grads]
    local = [g.to_local() if is_dtensor else g for g, is_dtensor in zip(grads, sharded, strict=True)]
    squares = torch.stack([g.detach().float().square().sum() for g in local]).sum()  # []
    if any(sharded):
        squares = all_reduce_sum(squares)
    return squares.sqrt()


def lr_factor(step: int, *, warmup: int, total: int, decay: str, floor: float = 0.0) -> float:
    """The default schedule's multiplier of the optimizer's lr for the step after ``step`` optimizer steps:
    ``(step + 1) / warmup`` during the warm-up (the first step already learns), then 1 (``decay`` constant), or a
    ``linear`` / ``cosine`` decay from 1 at the warm-up's end to ``floor`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def default_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup: int, decay: str, floor: float, max_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor``'s schedule, decaying (``decay`` linear or cosine) to ``floor`` at ``max_steps``, which must
    then be set (``trainer.max_steps``; None or <= 0: not set)."""
    total = 0
    if decay != "constant":
        if max_steps is None or max_steps <= 0:
            raise ValueError(
                f"model.lr_decay {decay!r} decays to trainer.max_steps, which is not set: set trainer.max_steps, or "
                "model.lr_decay constant"
            )
        total = max_steps
    factor = partial(lr_factor, warmup=warmup, total=total, decay=decay, floor=floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class GuardedOptimizerStep:
    """Steps the optimizer and scheduler unless the loss or the global gradient norm is not finite.

    Args:
        max_grad_norm: clip the global gradient norm to this value (0: no clipping).
        max_consecutive_skips: raise after this many skipped steps in a row.
    """

    def __init__(self, max_grad_norm: float, max_consecutive_skips: int) -> None:
        self.max_grad_norm, self.max_consecutive_skips = max_grad_norm, max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self.last_grad_norm = torch.zeros(())

    def metrics(self) -> dict[str, Any]:
        """``skipped_steps`` (so far) and ``grad_norm`` (of the last step), as the module logs them."""
        return {"skipped_steps": float(self.skipped), "grad_norm": self.last_grad_norm}

    def __call__(
        self,
        optimizer: Any,
        scheduler: Any,
        loss: torch.Tensor,
        all_reduce: Callable[[torch.Tensor, str], torch.Tensor],
        step: int,
    ) -> bool:
        """Step once. ``all_reduce(tensor, op)`` reduces over data-parallel ranks (``sum``, ``max``); it makes the
        gradient norm of sharded (FSDP2) gradients global and the skip decision common. Returns whether it stepped."""
        # the optimizer's own parameters: under FSDP2 the module's attributes may hold unsharded views at this point
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = global_grad_norm(grads, lambda t: all_reduce(t, "sum")) if grads else torch.zeros((), device=loss.device)
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float().reshape(())
        if float(all_reduce(bad, "max")) > 0:
            self.skipped += 1
            self.consecutive += 1
            log.warning(
                "step %d: non-finite loss %s or gradient norm %s on some rank; optimizer step skipped on every rank "
                "(%d in a row)",
                step,
                float(loss),
                float(norm),
                self.consecutive,
            )
            optimizer.zero_grad(set_to_none=True)
            if self.consecutive >= self.max_consecutive_skips:
                raise RuntimeError(
                    f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                    f"(max_consecutive_skips={self.max_consecutive_skips}); the weights are those of step {step}. "
                    "Check the rewards, the learning rate and the precision."
                )
            return False
        self.consecutive = 0
        if self.max_grad_norm > 0 and grads:
            coefficient = min(1.0, self.max_grad_norm / (float(norm) + 1e-6))  # torch's clip_grad_norm_ rule
            if coefficient < 1.0:
                for grad in grads:
                    grad.mul_(coefficient)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        self.last_grad_norm = norm.detach()
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "consecutive_skips": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped_steps", 0))
        self.consecutive = int(state.get("consecutive_skips", 0))
