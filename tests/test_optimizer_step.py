"""The guarded optimizer step: the skip decision is common to all ranks, clipping uses the global norm; the default
learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from lit_gcpo.training.optimizer_step import GuardedOptimizerStep, lr_factor


def _model_and_optimizer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 3)).sum().backward()
    return layer, optimizer


def _other_rank(flag_of_other: float, squares_of_other: float = 0.0):
    """An all-reduce over two ranks where the other rank contributes the given values."""

    def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        other = torch.full_like(tensor, flag_of_other if op == "max" else squares_of_other)
        return torch.maximum(tensor, other) if op == "max" else tensor + other

    return all_reduce


def test_a_non_finite_loss_on_another_rank_skips_here_too():
    layer, optimizer = _model_and_optimizer()
    before = [p.detach().clone() for p in layer.parameters()]
    step = GuardedOptimizerStep(max_grad_norm=0.0, max_consecutive_skips=5)
    stepped = step(optimizer, None, torch.tensor(0.5), all_reduce=_other_rank(1.0), step=0)  # finite here
    assert not stepped and step.skipped == 1 and step.consecutive == 1
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))
    assert all(p.grad is None for p in layer.parameters())  # the gradients of the skipped step are dropped


def test_finite_everywhere_steps_and_resets_the_run_of_skips():
    _layer, optimizer = _model_and_optimizer()
    step = GuardedOptimizerStep(max_grad_norm=0.0, max_consecutive_skips=5)
    step.consecutive = 3
    assert step(optimizer, None, torch.tensor(0.5), all_reduce=_other_rank(0.0), step=0)
    assert step.consecutive == 0 and step.skipped == 0


def test_persistent_skips_raise_on_every_rank_alike():
    _layer, optimizer = _model_and_optimizer()
    step = GuardedOptimizerStep(max_grad_norm=0.0, max_consecutive_skips=2)
    step(optimizer, None, torch.tensor(0.5), all_reduce=_other_rank(1.0), step=0)
    with pytest.raises(RuntimeError, match="max_consecutive_skips=2"):
        step(optimizer, None, torch.tensor(0.5), all_reduce=_other_rank(1.0), step=0)


def test_clipping_uses_the_norm_over_all_shards():
    """Here every gradient is local (3x2 + 2 = 8 entries); a sharded run would add the other ranks' squares.
    With the other rank adding 9.0 of squares, the global norm is sqrt(local^2 + 9) and the clip factor
    max_norm / that norm (hand formula below), not max_norm / local norm."""
    layer, optimizer = _model_and_optimizer()
    grads = [p.grad.clone() for p in layer.parameters()]
    local_sq = sum(float(g.square().sum()) for g in grads)
    # pretend the gradients are FSDP shards (to_local), so that the other rank's squares count
    for p in layer.parameters():
        p.grad.to_local = lambda g=p.grad: g
    step = GuardedOptimizerStep(max_grad_norm=0.5, max_consecutive_skips=5)
    optimizer.step = lambda: None  # keep the clipped gradients to inspect them
    optimizer.zero_grad = lambda set_to_none=True: None
    step(optimizer, None, torch.tensor(0.1), all_reduce=_other_rank(0.0, squares_of_other=9.0), step=0)
    factor = 0.5 / ((local_sq + 9.0) ** 0.5 + 1e-6)
    assert float(step.last_grad_norm) == pytest.approx((local_sq + 9.0) ** 0.5, rel=1e-6)
    for p, g in zip(layer.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("decay", "floor", "expected"),
    [
        # warm-up 2, decay over steps 2..10: (step + 1) / 2, then 1 - (step - 2) / 8 or (1 + cos(pi (step - 2) / 8)) / 2
        ("constant", 0.0, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", 0.0, [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]),
        ("cosine", 0.0, [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]),
        ("linear", 0.1, [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]),
    ],
)
def test_lr_factor_by_hand(decay, floor, expected):
    steps = [0, 1, 2, 6, 10, 12]
    got = [lr_factor(step, warmup=2, total=10, decay=decay, floor=floor) for step in steps]
    assert got == pytest.approx(expected, abs=1e-12)


def test_cosine_and_linear_differ_between_the_ends():
    # a quarter of the way: linear 0.75, cosine (1 + cos(pi / 4)) / 2 = 0.8536
    assert lr_factor(2, warmup=0, total=8, decay="linear") == pytest.approx(0.75)
    assert lr_factor(2, warmup=0, total=8, decay="cosine") == pytest.approx((1 + 2**-0.5) / 2)
