"""Log-probs as the model defines them: the memory-bounded path equals ``log_softmax(model(x).logits / T)`` for
plain heads, and models that transform their logits (Gemma-2's soft-capping, Cohere's and Granite's scaling)
are detected and scored through their own logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_gcpo.training.scoring import CompletionScorer, has_plain_head

COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen2":
        return transformers.Qwen2Config(**COMMON, num_key_value_heads=1)
    if kind == "gemma2":  # a soft cap small enough to bend random logits
        return transformers.Gemma2Config(**COMMON, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    if kind == "cohere":
        return transformers.CohereConfig(**COMMON, num_key_value_heads=2, logit_scale=0.25)
    if kind == "granite":
        return transformers.GraniteConfig(**COMMON, num_key_value_heads=2, logits_scaling=4.0)
    raise ValueError(kind)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = _config(kind)
    config.initializer_range = 0.5  # logits spread enough that a missing transform shows
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _expected(model, input_ids, attention_mask, completion_length: int, temperature: float) -> torch.Tensor:
    """Independent reference: the full logits of the model's own forward, log-softmaxed. [n, L]"""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    prompt_length = input_ids.shape[1] - completion_length
    scaled = logits[:, prompt_length - 1 : -1].float() / temperature  # [n, L, V]
    targets = input_ids[:, prompt_length:]
    return torch.log_softmax(scaled, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(
    ("kind", "plain"), [("llama", True), ("qwen2", True), ("gemma2", False), ("cohere", False), ("granite", False)]
)
def test_scorer_equals_the_models_own_logits(kind, plain):
    model = _model(kind)
    assert has_plain_head(model) is plain
    input_ids = torch.randint(1, 50, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    scorer = CompletionScorer(model, chunk_size=5)
    with torch.no_grad():
        scored = scorer(input_ids, attention_mask, 4, temperature=0.7, with_entropy=True, with_hidden=True)
    expected = _expected(model, input_ids, attention_mask, 4, 0.7)
    torch.testing.assert_close(scored.logprobs, expected, atol=2e-5, rtol=0)
    assert scored.entropy.shape == (3, 4) and scored.hidden.shape == (3, 4, 32)
    if not plain:  # the planted bug: treating the head as plain misses the transform
        wrong = CompletionScorer(model, chunk_size=5, plain_head=True)
        with torch.no_grad():
            gap = (wrong(input_ids, attention_mask, 4, temperature=0.7).logprobs - expected).abs().max()
        assert gap > 1e-2


def test_scorer_gradients_equal_the_models_own_logits():
    model = _model("qwen2").train()
    input_ids = torch.randint(1, 50, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    CompletionScorer(model, chunk_size=3)(input_ids, attention_mask, 3, temperature=1.0).logprobs.sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 3:-1]
    torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 4:].unsqueeze(-1)).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("kind", "plain"), [("llama", True), ("gemma2", False)])
def test_scorer_distribution_equals_the_models_own_logits(kind, plain):
    """The entropy and the mean log-prob over the vocabulary at each completion position, from the same forward as
    the log-probs, chunk by chunk, equal those of ``softmax(model(x).logits / T)`` computed densely here."""
    model = _model(kind)
    input_ids = torch.randint(1, 50, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded prompt
    scorer = CompletionScorer(model, chunk_size=5)  # 12 completion tokens: chunks of 5, 5 and 2
    assert scorer.plain_head is plain
    with torch.no_grad():
        scored = scorer(input_ids, attention_mask, 4, temperature=0.7, with_distribution=True)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    log_p = torch.log_softmax(logits[:, 4:-1].double() / 0.7, -1)  # [3, 4, V]
    torch.testing.assert_close(scored.distribution.entropy.double(), -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.distribution.mean_logprob.double(), log_p.mean(-1), atol=1e-5, rtol=0)
    assert scored.vocab_size == 50
    # the sampled tokens' log-probs are those of the pass without the summaries: the loss's ratio stays exactly 1
    with torch.no_grad():
        plain_pass = scorer(input_ids, attention_mask, 4, temperature=0.7)
    assert torch.equal(plain_pass.logprobs, scored.logprobs) and plain_pass.distribution is None
