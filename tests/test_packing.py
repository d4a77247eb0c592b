"""Padding-free passes: the packed layout by hand, and the packed log-probs, entropies, hidden states, loss and every
gradient equal to the padded pass and to a plain loop over each sequence alone, unpadded (the independent check)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import transformers
from test_training import trainer
from torch.nn.functional import pad, scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, flash_attention_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from lit_gcpo.algorithms.packing import pack, pack_layout, unpack_completions
from lit_gcpo.algorithms.token_distribution import TokenDistributionStats
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.data.rollout import pack_sequences
from lit_gcpo.running.cli import main
from lit_gcpo.training.module import GRPOModule
from lit_gcpo.training.scoring import CompletionScorer, ScoredTokens, base_model

# --------------------------------------------------------------------------------------------- layout by hand
# P = 3 prompt columns, L = 4 completion columns. Row 0: 3 prompt + 4 completion tokens; row 1: 1 prompt token
# (left-padded) + 2 completion tokens; row 2: 2 prompt tokens and an empty completion.
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]])


def test_layout_by_hand():
    layout = pack_layout(MASK, 4)
    # lengths 7, 3, 2 -> S = 12; row 1's tokens are flat 7 + (2, 3, 4), row 2's 14 + (1, 2)
    assert layout.token_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 15, 16]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1]
    assert layout.cu_seqlens.tolist() == [0, 7, 10, 12] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_seqlen == 7
    # completion tokens: row 0 at packed 3..6, predicted from 2..5; row 1 at packed 8, 9, predicted from 7, 8
    assert layout.predictors.tolist() == [2, 3, 4, 5, 7, 8]
    assert layout.completion_index.tolist() == [0, 1, 2, 3, 4, 5]  # into [3, 4]: row 0 cols 0-3, row 1 cols 0-1
    ids = torch.arange(21).view(3, 7)
    assert pack(ids, layout).tolist() == [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 15, 16]
    values = torch.arange(1.0, 7.0, requires_grad=True)
    unpacked = unpack_completions(values, layout)
    assert unpacked.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [0, 0, 0, 0]]
    (unpacked * torch.arange(12.0).view(3, 4)).sum().backward()
    assert values.grad.tolist() == [0, 1, 2, 3, 4, 5]  # each value's own [n, L] slot


def test_layout_agrees_with_transformers_reading_of_the_position_ids():
    """transformers' own functions, given only our position ids, find the same sequences and boundaries."""
    layout = pack_layout(MASK, 4)
    positions = layout.position_ids.unsqueeze(0)  # [1, S]
    assert find_packed_sequence_indices(positions).tolist() == [[0] * 7 + [1] * 3 + [2] * 2]
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(positions)
    assert cu_q.tolist() == cu_k.tolist() == layout.cu_seqlens.tolist() and int(max_q) == layout.max_seqlen


@pytest.mark.parametrize(
    ("mask", "length", "message"),
    [
        ([[1, 1, 1, 1, 0], [1, 1, 0, 1, 0]], 2, "row 1: its tokens are not contiguous"),
        ([[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]], 3, "row 0: a completion with no prompt token"),
        ([[1, 1, 1, 1, 0]], 5, r"P >= 1 prompt columns; got shape \(1, 5\) and completion_length 5"),
    ],
)
def test_layouts_that_cannot_be_packed_name_the_row(mask, length, message):
    with pytest.raises(ValueError, match=message):
        pack_layout(torch.tensor(mask), length)


# ------------------------------------------------------------------------------------------- ragged batches
PROMPTS = [2, 7, 4, 1, 5, 3]  # prompt lengths (left-padded to 7)
COMPLETIONS = [3, 30, 1, 12, 0, 6]  # completion lengths: 1 to 30, one empty (right-padded to 30)


def ragged_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask [6, 37]`` and ``completion_mask [6, 30]`` in the rollout layout."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (p,), generator=generator).tolist() for p in PROMPTS]
    completions = [torch.randint(1, vocab, (c,), generator=generator).tolist() for c in COMPLETIONS]
    return pack_sequences(prompts, completions, 0, torch.device("cpu"))


class LoopScorer:
    """The independent reference: each sequence alone, unpadded, through the model's own full logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        input_ids,
        attention_mask,
        completion_length,
        *,
        temperature=1.0,
        with_entropy=False,
        with_hidden=False,
        with_distribution=False,
    ) -> ScoredTokens:
        prompt_width = input_ids.shape[1] - completion_length
        logps, entropies, hiddens, lses, means = [], [], [], [], []
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            ids = input_ids[row, real].unsqueeze(0)  # [1, len]
            p, c = int(real[:prompt_width].sum()), int(real[prompt_width:].sum())
            logits = self.model(input_ids=ids, use_cache=False).logits[0, p - 1 : p + c - 1]  # [c, V]
            log_probs = torch.log_softmax(logits.float() / temperature, -1)  # [c, V]
            logps.append(pad(log_probs.gather(-1, ids[0, p:, None])[:, 0], (0, completion_length - c)))
            entropies.append(pad(-(log_probs.exp() * log_probs).sum(-1), (0, completion_length - c)))
            lses.append(pad(torch.logsumexp(logits.float() / temperature, -1), (0, completion_length - c)))
            means.append(pad(log_probs.mean(-1), (0, completion_length - c)))  # (1/V) sum_v log p_v
            if with_hidden:
                hidden = base_model(self.model).get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                hiddens.append(pad(hidden[0, p:], (0, 0, 0, completion_length - c)))
        distribution = None
        if with_distribution:
            distribution = TokenDistributionStats(torch.stack(lses), torch.stack(entropies), torch.stack(means))
        return ScoredTokens(
            torch.stack(logps),
            torch.stack(entropies) if with_entropy else None,
            torch.stack(hiddens) if with_hidden else None,
            distribution=distribution,
            vocab_size=base_model(self.model).get_output_embeddings().weight.shape[0] if with_distribution else None,
        )


COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny(kind: str, tiny_model_dir: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # the conftest's character Llama (tied embeddings, sdpa)
        return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if kind == "llama-eager":
        return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    if kind == "qwen2":  # attention biases, grouped KV heads, untied head
        config = transformers.Qwen2Config(**COMMON, num_key_value_heads=1)
    else:  # gemma2: a soft-capped head, scored through the model's own logits
        config = transformers.Gemma2Config(**COMMON, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    config.initializer_range = 0.5
    return transformers.AutoModelForCausalLM.from_config(config)


def _loss(scored: ScoredTokens, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A weighted token mean of log-probs and entropies, as ``token_mean`` normalises the policy loss (a sum over
    the 52 tokens would scale the gradients, and their float32 rounding, by 52)."""
    return (mask * (weights * scored.logprobs + 0.3 * scored.entropy)).sum() / mask.sum()


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("kind", ["llama", "llama-eager", "qwen2", "gemma2"])
def test_packed_scores_and_gradients_equal_padded_and_a_plain_loop(tiny_model_dir, kind, chunked):
    model = tiny(kind, tiny_model_dir).train()
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids, attention_mask, mask = ragged_batch(vocab)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))  # [6, 30]
    limit = 0 if chunked else 2**24  # 0: the memory-bounded autograd function, chunks of 7 tokens
    scorers = {
        "padded": CompletionScorer(model, 7, max_plain_elements=limit),
        "packed": CompletionScorer(model, 7, padding_free=True, max_plain_elements=limit),
        "loop": LoopScorer(model),
    }
    scored, grads = {}, {}
    for name, scorer in scorers.items():
        model.zero_grad()
        scored[name] = scorer(input_ids, attention_mask, 30, temperature=0.7, with_entropy=True, with_hidden=True)
        _loss(scored[name], mask, weights).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    keep = mask.bool()
    for name in ("padded", "packed"):
        for field in ("logprobs", "entropy", "hidden"):
            got, want = getattr(scored[name], field), getattr(scored["loop"], field)
            torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0, msg=f"{name} {field}")
        for param, grad in grads["loop"].items():
            torch.testing.assert_close(grads[name][param], grad, atol=1e-5, rtol=0, msg=f"{name} {param}")
    assert not scored["packed"].logprobs[~keep].any()  # padding columns are 0, not scores of pad tokens
    assert scored["loop"].logprobs[keep].std() > 0.1  # the model's log-probs differ between tokens


# ------------------------------------------------------------------- the varlen path, and a model that leaks
def _segments_attention(query, key, value, segments, scaling):
    """Causal attention within each of ``segments`` (``(row, token positions)``) of ``query [b, h, T, d]``, 0
    elsewhere: a plain loop."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    out = torch.zeros_like(query)
    for row, positions in segments:
        q, k, v = (x[row : row + 1, :, positions] for x in (query, key, value))
        out[row : row + 1, :, positions] = scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _varlen_loop_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A plain-loop stand-in for transformers' flash-attention dispatch (``_flash_attention_forward``) and its
    kernels, with flash-attention's mask function: a 2-D padding mask -> each row's real tokens (the unpad path);
    ``cu_seq_lens_*`` -> each segment of the packed row (the varlen path, which reads nothing else: no position
    ids); neither -> the whole row."""
    if attention_mask is not None:
        segments = [(row, attention_mask[row].nonzero().flatten()) for row in range(query.shape[0])]
    elif "cu_seq_lens_q" in kwargs:
        boundaries = kwargs["cu_seq_lens_q"].tolist()
        lengths = [stop - start for start, stop in itertools.pairwise(boundaries)]
        assert kwargs["cu_seq_lens_k"].tolist() == boundaries and kwargs["max_length_q"] == max(lengths)
        segments = [(0, torch.arange(start, stop)) for start, stop in itertools.pairwise(boundaries)]
    else:
        segments = [(row, torch.arange(query.shape[2])) for row in range(query.shape[0])]
    return _segments_attention(query, key, value, segments, scaling)


def _leaky_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A planted bug: causal attention over the whole row, as a model that ignores packing would compute."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    if attention_mask is None:
        out = scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:  # the padded pass: transformers' own mask
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def custom_attention():
    AttentionInterface.register("varlen_loop_cpu", _varlen_loop_attention)
    AttentionMaskInterface.register("varlen_loop_cpu", flash_attention_mask)  # what flash_attention_2 gets
    AttentionInterface.register("leaky_cpu", _leaky_attention)
    yield
    for name in ("varlen_loop_cpu", "leaky_cpu"):
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def test_the_boundaries_reach_the_attention_and_give_the_padded_scores(tiny_model_dir, custom_attention, monkeypatch):
    """What flash-attention's varlen kernel would read (``cu_seq_lens_*``, ``max_length_*``), read by a CPU loop
    that sees nothing else: the packed scores equal the padded pass's under sdpa."""
    model = tiny("llama", tiny_model_dir).eval()
    input_ids, attention_mask, mask = ragged_batch(model.config.vocab_size)
    keep = mask.bool()
    with torch.no_grad():
        padded = CompletionScorer(model, 7)(input_ids, attention_mask, 30)
        model.set_attn_implementation("varlen_loop_cpu")
        scorer = CompletionScorer(model, 7, padding_free=True)
        packed = scorer(input_ids, attention_mask, 30)
        torch.testing.assert_close(packed.logprobs[keep], padded.logprobs[keep], atol=1e-5, rtol=0)

        def shifted(*args):  # the planted bug: boundaries one token early (the position ids still right)
            layout = pack_layout(*args)
            return dataclasses.replace(layout, cu_seqlens=(layout.cu_seqlens - 1).clamp(min=0))

        monkeypatch.setattr("lit_gcpo.training.scoring.pack_layout", shifted)
        wrong = scorer(input_ids, attention_mask, 30)
    assert (wrong.logprobs[keep] - padded.logprobs[keep]).abs().max() > 1e-2


def test_a_model_whose_attention_ignores_packing_is_refused(tiny_model_dir, custom_attention):
    model = tiny("llama", tiny_model_dir).eval()
    model.set_attn_implementation("leaky_cpu")
    assert CompletionScorer(model, 7).plain_head  # the padded pass is fine with it
    with pytest.raises(ValueError, match=r"padding_free: LlamaForCausalLM with attn_implementation 'leaky_cpu'"):
        CompletionScorer(model, 7, padding_free=True)


# ------------------------------------------------------------------------------------------ through the module
class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every step's gradients, in parameter order."""

    def __init__(self, params, lr: float = 1e-4) -> None:
        super().__init__(params, lr=lr)
        self.recorded: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.recorded.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def rollout(vocab: int) -> RolloutBatch:
    """The ragged batch as two groups of 3 completions with reward spread."""
    input_ids, attention_mask, mask = ragged_batch(vocab)
    return RolloutBatch(
        prompts=["a", "b"],
        rows=[{}, {}],
        completions=[""] * 6,
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=mask,
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0]),
        temperature=0.7,
    )


def fit_one_batch(tiny_model_dir, tmp_path, scorer: str, chunked: bool) -> tuple[GRPOModule, RolloutBatch, dict]:
    """One rollout batch through ``score_rollout`` and a real ``training_step`` (2 optimizer steps of 2
    micro-batches each, KL to the reference, an entropy bonus) with the ``padded``, ``packed`` or ``loop`` scorer."""
    module = GRPOModule(
        model=tiny_model_dir,
        optimizer=RecordingSGD,
        beta=0.05,
        entropy_coef=0.01,
        num_iterations=2,
        micro_batch_size=4,
        max_grad_norm=0.0,
        logprob_chunk_size=5,
        padding_free=scorer == "packed",
        log_samples_every_n_steps=0,
        export_dir=None,
    )
    with torch.no_grad():  # the policy moves away from the reference (the same noise in every run)
        generator = torch.Generator().manual_seed(2)
        for param in module.policy.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    scorers = [module.scorer, module.reference.scorer]
    if scorer == "loop":
        module.scorer, module.reference.scorer = LoopScorer(module.policy), LoopScorer(module.reference.model)
    for each in scorers:
        each.max_plain_elements = 0 if chunked else 2**24  # 0: chunks of 5 tokens in the autograd function
    batch = rollout(module.policy.config.vocab_size)
    module.score_rollout(batch)
    run = trainer(tmp_path / scorer, 1, log_every_n_steps=1)
    run.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    logged = {k: float(v) for k, v in run.logged_metrics.items() if k.startswith("train/")}
    return module, batch, logged


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_module_scores_loss_and_gradients_equal_padded_and_a_plain_loop(tiny_model_dir, tmp_path, chunked):
    runs = {name: fit_one_batch(tiny_model_dir, tmp_path, name, chunked) for name in ("loop", "padded", "packed")}
    _, loop_batch, loop_logged = runs["loop"]
    keep = loop_batch.completion_mask.bool()
    assert loop_logged["train/kl_mean"] > 1e-4 and abs(loop_logged["train/loss"]) > 1e-4  # both terms are there
    for name in ("padded", "packed"):
        module, batch, logged = runs[name]
        for field in ("old_logprobs", "ref_logprobs", "embeddings", "token_entropy", "token_mean_logprob"):
            got, want = getattr(batch, field), getattr(loop_batch, field)
            rows = keep if field != "embeddings" else slice(None)
            torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=0, msg=f"{name} {field}")
        for key in ("loss", "policy_loss", "kl_mean", "kl_max", "approx_kl", "ratio_max", "entropy", "grad_norm"):
            key = f"train/{key}"
            assert logged[key] == pytest.approx(loop_logged[key], abs=1e-5), (name, key)
        steps = module.optimizers().optimizer.recorded
        loop_steps = runs["loop"][0].optimizers().optimizer.recorded
        assert len(steps) == len(loop_steps) == 2
        for step, loop_step in zip(steps, loop_steps, strict=True):
            for (param, _), grad, want in zip(module.policy.named_parameters(), step, loop_step, strict=True):
                torch.testing.assert_close(grad, want, atol=1e-5, rtol=0, msg=f"{name} {param}")


def test_the_option_is_in_help_and_a_bad_value_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--model.padding_free {true,false}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.padding_free", "sometimes"])
    assert exit_info.value.code == 2
    assert 'Parser key "model.padding_free"' in capsys.readouterr().err


def test_the_attention_implementation_reaches_the_policy_and_the_reference(tiny_model_dir):
    module = GRPOModule(model=tiny_model_dir, attn_implementation="eager", beta=0.1, padding_free=True, export_dir=None)
    assert module.policy.config._attn_implementation == "eager"
    assert module.reference.model.config._attn_implementation == "eager"
    assert module.scorer.padding_free and module.reference.scorer.padding_free
    default = GRPOModule(model=tiny_model_dir, export_dir=None)
    assert default.policy.config._attn_implementation == "sdpa" and not default.scorer.padding_free


def test_lora_policy_and_its_adapter_free_reference_pack_alike(tiny_model_dir):
    """Under LoRA the reference is the policy with its adapters disabled, through the same (packed) scorer."""
    from lit_gcpo.training.policy import LoraOptions

    module = GRPOModule(model=tiny_model_dir, lora=LoraOptions(r=4, alpha=8), beta=0.1, padding_free=True)
    with torch.no_grad():  # adapters that change the output (peft initialises B to 0)
        generator = torch.Generator().manual_seed(3)
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    input_ids, attention_mask, mask = ragged_batch(module.policy.config.vocab_size)
    keep, results = mask.bool(), {}
    for packed in (False, True):
        module.scorer.padding_free = packed
        module.policy.zero_grad()
        logprobs, _, _ = module.completion_logprobs(input_ids, attention_mask, 30)
        (logprobs * mask).sum().div(mask.sum()).backward()
        with torch.no_grad():
            reference, _, _ = module.completion_logprobs(input_ids, attention_mask, 30, reference=True)
        grads = [p.grad.clone() for p in module.policy.parameters() if p.requires_grad]
        results[packed] = (logprobs.detach(), reference, grads)
    for padded, packed in zip(results[False], results[True], strict=True):
        if isinstance(padded, list):
            for a, b in zip(padded, packed, strict=True):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(packed[keep], padded[keep], atol=1e-5, rtol=0)
    assert (results[True][0] - results[True][1])[keep].abs().max() > 1e-2  # the adapters are on in the policy only
