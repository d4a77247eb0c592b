"""The ``hf`` rollout engine: Hugging Face ``generate`` on the live policy.

It generates with the very module the trainer updates, so ``sync_weights`` has nothing to do. Sampling
is made reproducible without touching the trainer's RNG: each call forks the global RNG and seeds it
from ``SamplingConfig.seed``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lit_gcpo.engines.base import Generation, RolloutEngine, SamplingConfig


class HFEngine(RolloutEngine):
    """Generation with ``policy.generate``.

    Args:
        policy: a transformers causal LM (the trained module itself).
        tokenizer: its tokenizer; ``pad_token_id`` falls back to ``eos_token_id``.
        max_batch_size: at most this many sequences per ``generate`` call (bounds memory); 0 = all at once.
    """

    samples_from_policy = True

    def __init__(self, policy: torch.nn.Module, tokenizer, max_batch_size: int = 0) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: the engine samples from the live policy."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_samples: int, sampling: SamplingConfig) -> Generation:
        sequences = [ids for ids in prompt_ids for _ in range(num_samples)]  # group-major
        chunk = self.max_batch_size or len(sequences)
        was_training = self.policy.training
        self.policy.eval()
        device = next(self.policy.parameters()).device
        out_ids: list[list[int]] = []
        out_logprobs: list[list[float]] = []
        out_truncated: list[bool] = []
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(sequences), chunk):
                    ids, logprobs, truncated = self._generate_chunk(sequences[start : start + chunk], sampling, device)
                    out_ids += ids
                    out_logprobs += logprobs
                    out_truncated += truncated
        finally:
            self.policy.train(was_training)
        return Generation(completion_ids=out_ids, logprobs=out_logprobs, truncated=out_truncated)

    def _generate_chunk(
        self, sequences: list[list[int]], sampling: SamplingConfig, device: torch.device
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)  # [n, P]
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(sequences):  # left padding, so that generation continues every row
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention_mask[row, width - len(seq) :] = 1
        greedy = sampling.temperature == 0
        kwargs = dict(
            do_sample=not greedy,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
        else:  # silence the model's own sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        out = self.policy.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
        generated = out.sequences[:, width:].cpu()  # [n, T]
        temperature = 1.0 if greedy else sampling.temperature
        logits = torch.stack(out.logits, dim=1).float().cpu() / temperature  # [n, T, V]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # [n, T]
        ids_out, logprobs_out, truncated = [], [], []
        for row in range(generated.shape[0]):
            tokens = generated[row].tolist()
            length = self._completion_length(tokens, sampling.stop)
            ids_out.append(tokens[:length])
            logprobs_out.append(logprobs[row, :length].tolist())
            finished = length < len(tokens) or (length > 0 and self._is_finished(tokens[:length], sampling.stop))
            truncated.append(not finished)
        return ids_out, logprobs_out, truncated

    def _completion_length(self, tokens: list[int], stop: list[str]) -> int:
        """Tokens up to and including EOS or the token that completes a stop string."""
        for position, token in enumerate(tokens):
            if token == self.eos_token_id:
                return position + 1
        if stop:
            text = ""
            for position, token in enumerate(tokens):
                text += self.tokenizer.decode([token])
                if any(s in text for s in stop):
                    return position + 1
        return len(tokens)

    def _is_finished(self, tokens: list[int], stop: list[str]) -> bool:
        if tokens[-1] == self.eos_token_id:
            return True
        text = self.tokenizer.decode(tokens)
        return any(s in text for s in stop)
