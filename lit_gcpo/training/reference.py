"""The frozen reference model of the KL term, placed the way the Trainer places the policy.

It is deliberately not a submodule of the LightningModule: it is never trained, never in a checkpoint
(it is the starting weights, reloaded from ``model``), and Lightning neither wraps it nor moves it. This
class does what the strategy and precision would have done: the device of the policy, FSDP2 sharding like
the policy's, and the dtype the precision computes in:

- ``bf16-true`` (and ``64-true``): the whole model in that dtype, as Lightning converts the policy.
- ``bf16-mixed``: the decoder layers' linear weights and biases in bf16, the rest (embeddings, norms, the
  output head) in fp32.
  Autocast computes every linear layer in bf16 from a bf16 cast of its fp32 weight, so holding that cast is
  the same computation with half the memory for the bulk of the parameters; embeddings and norms stay fp32
  because autocast keeps them (and the residual stream) in fp32: a fully bf16 copy gave log-probs up to
  0.14 away from the policy's at step 0, a KL penalty on nothing but rounding.
"""

from __future__ import annotations

import torch

from lit_gcpo.training.parallel import shard_causal_lm
from lit_gcpo.training.policy import load_policy
from lit_gcpo.training.scoring import CompletionScorer

# The dtype the whole reference is held in under "true" precisions (absent: as loaded).
_TRUE_DTYPES = {"bf16-true": torch.bfloat16, "64-true": torch.float64, "64": torch.float64}


class ReferencePolicy:
    """A frozen copy of the starting policy that scores completions for the KL term.

    Args:
        model: the policy's model name or path (the reference is its starting weights).
        dtype: the dtype it is loaded in (the policy's ``dtype``); :meth:`place` may cast it.
        attn_implementation: transformers' attention implementation (the policy's).
        like: the policy's scorer, whose settings this one's takes (chunk size, its plain-head check, padding-free
            passes, the latter checked again on this copy).
    """

    def __init__(self, model: str, dtype: str, attn_implementation: str | None, like: CompletionScorer) -> None:
        self.model = load_policy(model, dtype, None, True, attn_implementation).eval().requires_grad_(False)
        self.scorer = CompletionScorer(
            self.model, like.chunk_size, like.plain_head, like.padding_free, like.max_plain_elements
        )

    def place(self, device: torch.device, precision: str, mesh: object | None = None) -> None:
        """Move to ``device`` in the dtype of ``precision``, and shard over ``mesh`` (FSDP2) when given."""
        self.model.to(device=device, dtype=_TRUE_DTYPES.get(str(precision)))
        if str(precision) == "bf16-mixed":
            # the decoder layers' linear layers only: the output head may be tied to the embedding (casting it
            # would cast the embedding too), and keeping it fp32 keeps the root FSDP unit of one dtype
            for module in self.model.get_decoder().layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
        if mesh is not None:
            shard_causal_lm(self.model, mesh)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its linear layers (the bulk of its parameters)."""
        return self.model.get_decoder().layers[0].mlp.down_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
