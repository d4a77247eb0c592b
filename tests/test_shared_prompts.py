"""Shared prompt passes (``lit_gcpo.training.shared_prompts``): the runs of equal prompts by hand; the shared pass's
log-probs, entropies, hidden states, token summaries and every gradient equal to the plain padded pass and to a loop
over each sequence alone; the cases that take the plain pass (nothing shared, gradient checkpointing, attentions that
ignore or refuse a cache, padding-free passes); a training step and the hf engine's prefill that share it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from test_training import make_pair, trainer
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import lit_gcpo.training.scoring as scoring
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.engines.kv_cache import BufferedLayer
from lit_gcpo.training.policy import load_policy, load_tokenizer
from lit_gcpo.training.scoring import CompletionScorer
from lit_gcpo.training.shared_prompts import prompt_runs

COMMON = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _model(kind: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # tied embeddings
        config = transformers.LlamaConfig(**COMMON, num_key_value_heads=4, tie_word_embeddings=True)
    else:  # grouped-query attention, biases on q/k/v
        config = transformers.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=False)
    config.initializer_range = 0.3
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


# --------------------------------------------------------------------------------------------- runs by hand
def test_prompt_runs_by_hand():
    ids = torch.tensor([[1, 2, 9], [1, 2, 8], [3, 4, 9], [3, 4, 7], [3, 4, 7], [1, 2, 9], [5, 4, 9]])
    mask = torch.ones_like(ids)
    # P = 2: prompts A A B B B A C; the second A is a run of its own (not next to the first)
    first, rows = prompt_runs(ids, mask, 2)
    assert first.tolist() == [0, 2, 5, 6] and rows.tolist() == [0, 0, 1, 1, 1, 2, 3]
    mask[1, 0] = 0  # the same ids with another mask: another prompt
    assert prompt_runs(ids, mask, 2)[1].tolist() == [0, 1, 2, 2, 2, 3, 4]
    assert prompt_runs(ids[[0, 2, 5, 6]], mask[[0, 2, 5, 6]], 2) is None  # nothing shared: no runs
    assert prompt_runs(ids[:1], mask[:1], 2) is None


# ------------------------------------------------------------------------------------------- equal numbers
PROMPT_LENGTHS = [5, 3, 4]  # three prompts, left-padded to P = 5
GROUPS = [3, 2, 3]  # their completions, consecutive
COMPLETION_LENGTHS = [6, 2, 4, 1, 6, 3, 5, 6]  # right-padded to L = 6


def _grouped_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask [8, 11]``: each prompt repeated for its group, the rollout layout."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (n,), generator=generator) for n in PROMPT_LENGTHS]
    input_ids = torch.zeros(8, 11, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    row = 0
    for prompt, size in zip(prompts, GROUPS, strict=True):
        for _ in range(size):
            input_ids[row, 5 - len(prompt) : 5] = prompt
            attention_mask[row, 5 - len(prompt) : 5] = 1
            length = COMPLETION_LENGTHS[row]
            input_ids[row, 5 : 5 + length] = torch.randint(1, vocab, (length,), generator=generator)
            attention_mask[row, 5 : 5 + length] = 1
            row += 1
    return input_ids, attention_mask


def _alone(model, input_ids, attention_mask) -> torch.Tensor:
    """Independent reference: each sequence alone, unpadded, through the model's own logits. ``[n, 6]``, 0 on
    padding."""
    out = torch.zeros(input_ids.shape[0], 6)
    with torch.no_grad():
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()].unsqueeze(0)  # [1, p + c]
            length = int(attention_mask[row, 5:].sum())
            log_p = torch.log_softmax(model(input_ids=ids).logits[0, -length - 1 : -1].float() / 0.8, -1)
            out[row, :length] = log_p.gather(-1, ids[0, -length:].unsqueeze(-1)).squeeze(-1)
    return out


class ForwardShapes:
    """Records the ``input_ids`` shape of every forward of ``model``'s decoder (``training_only``: in train mode)."""

    def __init__(self, model: torch.nn.Module, training_only: bool = False) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.training_only = training_only
        model.get_decoder().register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, _args, kwargs) -> None:
        if module.training or not self.training_only:
            self.shapes.append(tuple(kwargs["input_ids"].shape))


def _scores_and_grads(scorer, model, input_ids, attention_mask):
    options = {"temperature": 0.8, "with_entropy": True, "with_hidden": True, "with_distribution": True}
    model.zero_grad()
    scored = scorer(input_ids, attention_mask, 6, **options)
    mask = attention_mask[:, 5:].float()
    weights = torch.linspace(-1.0, 2.0, input_ids.shape[0]).unsqueeze(-1)  # [n, 1]: advantages of both signs
    ((scored.logprobs * weights + 0.3 * scored.entropy) * mask).sum().backward()
    return scored, {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("rows", [slice(0, 8), slice(1, 7)], ids=["whole groups", "cut groups"])
def test_the_shared_pass_equals_the_plain_pass_and_each_sequence_alone(kind, rows):
    model = _model(kind)
    input_ids, attention_mask = (t[rows] for t in _grouped_batch(model.config.vocab_size))
    shared, plain = CompletionScorer(model, 4), CompletionScorer(model, 4, share_prompts=False)
    assert shared.shares_prompts and shared.prompt_sharing_problem is None
    shapes = ForwardShapes(model)
    model.train()
    got, got_grads = _scores_and_grads(shared, model, input_ids, attention_mask)
    distinct = len(set(prompt_runs(input_ids, attention_mask, 5)[1].tolist()))
    assert shapes.shapes == [(distinct, 5), (input_ids.shape[0], 6)]  # the prompts once, then the completions
    want, want_grads = _scores_and_grads(plain, model, input_ids, attention_mask)
    keep = attention_mask[:, 5:].bool()
    for field in ("logprobs", "entropy", "hidden"):
        torch.testing.assert_close(getattr(got, field)[keep], getattr(want, field)[keep], atol=1e-5, rtol=0)
    for field in ("entropy", "mean_logprob"):
        got_field, want_field = getattr(got.distribution, field), getattr(want.distribution, field)
        torch.testing.assert_close(got_field[keep], want_field[keep], atol=1e-5, rtol=0)
    for name, grad in want_grads.items():  # float rounding: 1e-6 of the largest entry (gradients up to ~30 here)
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    model.eval()
    alone = _alone(model, input_ids, attention_mask)
    torch.testing.assert_close(got.logprobs.detach()[keep], alone[keep], atol=1e-5, rtol=0)
    assert alone[keep].std() > 0.1  # the log-probs differ between tokens: a mix-up would show


def test_a_cache_gathered_to_the_wrong_rows_is_caught(monkeypatch):
    """The planted bug: each completion run on the next group's prompt. The comparison above fails on it."""
    model = _model("llama")
    input_ids, attention_mask = _grouped_batch(model.config.vocab_size)
    input_ids, attention_mask = input_ids[[0, 1, 5, 6]], attention_mask[[0, 1, 5, 6]]  # prompts 0, 0, 2, 2 (P = 5)
    scorer = CompletionScorer(model, 4)

    def swapped(ids, mask, prompt_length):
        first, rows = prompt_runs(ids, mask, prompt_length)
        return first, 1 - rows  # the two prompts' caches exchanged

    monkeypatch.setattr(scoring, "prompt_runs", swapped)
    with torch.no_grad():
        wrong = scorer(input_ids, attention_mask, 6, temperature=0.8).logprobs
    keep = attention_mask[:, 5:].bool()
    assert (wrong - _alone(model, input_ids, attention_mask))[keep].abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ the plain pass
def _cacheless_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A planted attention that ignores the cache: only the columns of this call (causal)."""
    q_length = query.shape[2]
    repeat = query.shape[1] // key.shape[1]
    key, value = (x[:, :, -q_length:].repeat_interleave(repeat, 1) for x in (key, value))
    out = scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _refusing_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A planted kernel that cannot read a cache (as a custom attention may)."""
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError("no KV cache here")
    return _cacheless_attention(module, query, key, value, attention_mask, dropout, scaling)


@pytest.fixture
def planted_attentions():
    for name, function in (("cacheless_cpu", _cacheless_attention), ("refusing_cpu", _refusing_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
    yield
    for name in ("cacheless_cpu", "refusing_cpu"):
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def test_models_the_shared_pass_would_get_wrong_take_the_plain_pass(planted_attentions):
    input_ids, attention_mask = _grouped_batch(COMMON["vocab_size"])
    input_ids, attention_mask = input_ids[:3], torch.ones_like(attention_mask[:3])  # one prompt, unpadded
    for name, reason in (("cacheless_cpu", "moves the log-probs by"), ("refusing_cpu", "NotImplementedError")):
        model = _model("llama", attn_implementation=name)
        scorer = CompletionScorer(model, 4)
        assert not scorer.shares_prompts and reason in scorer.prompt_sharing_problem
        shapes = ForwardShapes(model)
        with torch.no_grad():
            scorer(input_ids, attention_mask, 6)
        assert shapes.shapes == [(3, 11)]  # one plain pass


def test_nothing_shared_gradient_checkpointing_and_padding_free_take_the_plain_pass():
    model = _model("llama")
    input_ids, attention_mask = _grouped_batch(model.config.vocab_size)
    scorer, plain = CompletionScorer(model, 4), CompletionScorer(model, 4, share_prompts=False)
    shapes = ForwardShapes(model)
    with torch.no_grad():
        scorer(input_ids[[0, 3, 5]], attention_mask[[0, 3, 5]], 6)  # three distinct prompts
    assert shapes.shapes == [(3, 11)]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    shapes.shapes.clear()
    got = scorer(input_ids, attention_mask, 6).logprobs  # transformers would drop the cache: not shared
    assert shapes.shapes == [(8, 11)]
    model.gradient_checkpointing_disable()
    keep = attention_mask[:, 5:].bool()
    torch.testing.assert_close(got[keep], plain(input_ids, attention_mask, 6).logprobs[keep], atol=1e-6, rtol=0)
    assert CompletionScorer(model, 4, padding_free=True).prompt_sharing_problem == "padding-free passes"


# ---------------------------------------------------------------------------------------- a training step
def test_a_training_step_with_shared_prompt_passes_makes_the_same_update(tiny_model_dir, tmp_path):
    """The module's scoring and training passes share the prompts (groups of 4, micro-batches of 5 cut them);
    the update, loss and entropy equal those of the plain passes."""
    weights, logged, shapes = [], [], []
    for share in (True, False):
        L.seed_everything(0)
        module, data = make_pair(tiny_model_dir, lr=0.5, micro_batch_size=5)
        module.scorer = CompletionScorer(module.policy, 4096, share_prompts=share)
        recorder = ForwardShapes(module.policy, training_only=True)  # the training passes, not sampling
        run = trainer(tmp_path / str(share), 1, log_every_n_steps=1)
        run.fit(module, data)
        weights.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})
        logged.append({k: float(run.logged_metrics[f"train/{k}"]) for k in ("loss", "policy_loss", "entropy")})
        shapes.append([shape[0] for shape in recorder.shapes])
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, atol=1e-6, rtol=0, msg=name)
    for key, value in logged[1].items():
        assert logged[0][key] == pytest.approx(value, abs=1e-6), key
    # micro-batches of rows 0-4, 5-9, 10-11 hold 2, 2 and 1 prompts: each run once, then its completions
    assert shapes[0] == [2, 5, 2, 5, 1, 2] and shapes[1] == [5, 5, 2]


# ------------------------------------------------------------------------------------------- the hf engine
def test_the_engine_feeds_each_prompt_once_and_samples_as_before(tiny_model_dir, monkeypatch):
    policy, tokenizer = load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    engine = HFEngine(policy, tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in ("3+4=", "12*3=", "7-9=")]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    engine._exact_step_masks()  # its one-off probe, before the spy
    shapes = ForwardShapes(policy)
    shared = engine.generate(prompts, 4, sampling, seeds=[5, 6, 7], with_embeddings=True)
    assert shapes.shapes[0][0] == 3 and shapes.shapes[1][0] == 12  # three prompts fed, then twelve rows
    import lit_gcpo.engines.decoding as decoding

    monkeypatch.setattr(decoding, "prompt_runs", lambda *args: None)  # the prefill of every row
    plain = engine.generate(prompts, 4, sampling, seeds=[5, 6, 7], with_embeddings=True)
    assert shared.completion_ids == plain.completion_ids and shared.truncated == plain.truncated
    assert len(set(map(tuple, shared.completion_ids))) > 6  # a group's rows sample apart from one prefill
    for mine, theirs in zip(shared.logprobs, plain.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.embeddings, plain.embeddings, atol=1e-5, rtol=0)


def test_buffered_layer_gathers_rows_with_repeats():
    layer = BufferedLayer(capacity=8)
    written = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)  # 2 rows, 3 columns
    layer.update(written, -written)
    layer.batch_gather(torch.tensor([0, 0, 1]))
    assert torch.equal(layer.keys, written[[0, 0, 1]]) and torch.equal(layer.values, -written[[0, 0, 1]])
    keys, values = layer.update(torch.ones(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))  # writing goes on after them
    assert keys.shape == (3, 1, 4, 2) and torch.equal(keys[:, :, :3], written[[0, 0, 1]])
    assert torch.equal(values[:, :, 3], torch.zeros(3, 1, 2))
