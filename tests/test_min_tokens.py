"""``data.sampling.min_tokens`` (vLLM's ``SamplingParams.min_tokens``, transformers' ``min_new_tokens``): tokens
``0 .. k - 1`` are never an end-of-sequence id and never complete a stop string; the hf engine reports the log-probs
of the distribution it sampled from (end-of-sequence logits at -inf); the trainer's old log-probs stay the policy's,
so the on-policy ratio is still 1; a bound beyond ``max_new_tokens`` is refused at parse time."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_training import CaptureBatches, full_log_softmax, make_pair, trainer

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.decoding import TokenSampler
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.training.policy import load_policy, load_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


@contextlib.contextmanager
def eos_boosted(model: torch.nn.Module, eos: int, boost: float) -> Iterator[None]:
    """While open, ``boost`` is added to the policy's end-of-sequence logit (a policy that wants to end at once)."""

    def add(_module, _inputs, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(-1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), boost))

    hook = model.get_output_embeddings().register_forward_hook(add)
    try:
        yield
    finally:
        hook.remove()


def _prompt(tokenizer, text: str = "13+4=") -> list[int]:
    return tokenizer(text)["input_ids"]


def test_validation_names_the_option_and_its_bound():
    assert SamplingConfig(max_new_tokens=8, min_tokens=8).min_tokens == 8  # the same-length setting is allowed
    for bad in (-1, 9):
        with pytest.raises(
            ValueError, match=rf"sampling.min_tokens must be in \[0, max_new_tokens\] = \[0, 8\], got {bad}"
        ):
            SamplingConfig(max_new_tokens=8, min_tokens=bad)


def test_a_bound_beyond_max_new_tokens_fails_at_parse_time(capsys, monkeypatch):
    from lit_gcpo.running.cli import main

    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.setattr(sys, "argv", ["lit-gcpo"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as exit_info:  # quickstart.yaml: max_new_tokens 16
        main(["fit", "--config", "configs/quickstart.yaml", "--data.sampling.min_tokens", "17"])
    assert exit_info.value.code != 0
    assert "data.sampling.min_tokens must be in [0, max_new_tokens] = [0, 16], got 17" in capsys.readouterr().err
    # every completion truncated, and every truncated completion out of the loss: nothing would train
    both = ["--data.sampling.min_tokens=16", "--model.mask_truncated_completions=true"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", *both])
    assert "model.mask_truncated_completions would leave all of them out" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_min_tokens_holds_off_a_policy_that_would_end_at_once(model_and_tokenizer, temperature):
    """EOS logit +30: without min_tokens every completion is the EOS alone. With min_tokens = max_new_tokens every
    completion has exactly max_new_tokens tokens and no EOS (truncated); with min_tokens = 3 each is 3 tokens and
    then the EOS (p_eos ~ 1 as soon as it is allowed), sampled and greedy."""
    model, tokenizer = model_and_tokenizer
    eos, engine = tokenizer.eos_token_id, HFEngine(model, tokenizer)
    prompts = [_prompt(tokenizer, text) for text in ("13+4=", "7*8=", "1+2=")]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=10)
    with eos_boosted(model, eos, 30.0):
        free = engine.generate(prompts, 4, sampling, seeds=[1, 2, 3])
        same_length = engine.generate(prompts, 4, replace(sampling, min_tokens=10), seeds=[1, 2, 3])
        three = engine.generate(prompts, 4, replace(sampling, min_tokens=3), seeds=[1, 2, 3])
    assert free.completion_ids == [[eos]] * 12 and not any(free.truncated)
    assert [len(c) for c in same_length.completion_ids] == [10] * 12 and all(same_length.truncated)
    assert all(eos not in c for c in same_length.completion_ids)
    assert all(len(c) == 4 and c[-1] == eos and eos not in c[:3] for c in three.completion_ids)
    assert not any(three.truncated)


def test_reported_logprobs_are_those_of_the_distribution_sampled_from(model_and_tokenizer):
    """Steps t < k: log_softmax(logits / T) with the EOS logit at -inf (what was sampled from; vLLM's processed
    log-probs); steps t >= k: the policy's own, as without min_tokens. Against a full forward of each completion.
    With the EOS logit +3 the two differ by -log(1 - p_eos) at every constrained step, far beyond the tolerance."""
    model, tokenizer = model_and_tokenizer
    eos, k, temperature = tokenizer.eos_token_id, 4, 0.8
    prompts = [_prompt(tokenizer, text) for text in ("1+2=", "13+4=")]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=8, min_tokens=k)
    with eos_boosted(model, eos, 3.0):
        out = HFEngine(model, tokenizer).generate(prompts, 3, sampling, seeds=[1, 2])
        assert min(len(c) for c in out.completion_ids) >= k
        for row, completion in enumerate(out.completion_ids):
            prompt = prompts[row // 3]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]  # [L, V]
            scaled = logits.float() / temperature  # [L, V]
            policy = torch.log_softmax(scaled, -1)  # [L, V]
            suppressed = torch.log_softmax(scaled.index_fill(-1, torch.tensor([eos]), float("-inf")), -1)
            token = torch.tensor(completion).unsqueeze(-1)  # [L, 1]
            expected = torch.cat([suppressed[:k].gather(-1, token[:k]), policy[k:].gather(-1, token[k:])])[:, 0]
            torch.testing.assert_close(torch.tensor(out.logprobs[row]), expected, atol=1e-5, rtol=0)
            gap = (suppressed[:k] - policy[:k]).gather(-1, token[:k])  # -log(1 - p_eos) at each constrained step
            assert (gap > 1e-3).all()  # 100x the tolerance (measured 0.009 to 3.8)


def test_the_sampler_changes_only_the_steps_before_min_tokens():
    """Same logits and uniforms: at steps >= k the tokens and log-probs are bit-equal to those without min_tokens;
    at steps < k they are those of the sampler without min_tokens given the logits with the EOS ids at -inf (top-k
    after the suppression, vLLM's order). Logits with large EOS entries, so the suppression moves many draws."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 30, generator=generator)  # [r, V]
    logits[:, [2, 7]] += 2.0  # the EOS ids
    uniforms = torch.rand(64, generator=generator, dtype=torch.float64)  # [r]
    end_ids = torch.tensor([2, 7])
    base = SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=8)
    plain, constrained = TokenSampler(base), TokenSampler(replace(base, min_tokens=3), end_ids)
    for step in (3, 5, 7):
        for mine, theirs in zip(constrained(logits, uniforms, step), plain(logits, uniforms, step), strict=True):
            assert torch.equal(mine, theirs)
    suppressed = logits.index_fill(-1, end_ids, float("-inf"))
    for step in (0, 2):
        token, log_probs = constrained(logits, uniforms, step)
        expected_token, expected = plain(suppressed, uniforms, step)
        assert torch.equal(token, expected_token) and torch.equal(log_probs, expected)
        assert not torch.isin(token, end_ids).any()
    free_token, _ = plain(logits, uniforms, 0)
    assert torch.isin(free_token, end_ids).sum() >= 10  # without it the EOS ids are drawn often
    with pytest.raises(ValueError, match="end-of-sequence ids"):
        TokenSampler(replace(base, min_tokens=3))


def test_tokens_after_min_tokens_follow_the_policy(model_and_tokenizer):
    """3,000 seeded completions of 2 tokens with min_tokens 1 and the EOS logit +3: the first token follows the
    softmax without EOS; the second, after the most frequent first token, follows the policy's softmax itself,
    EOS included (about half of them end there). Each frequency within 5 sigma of its probability."""
    model, tokenizer = model_and_tokenizer
    eos, n = tokenizer.eos_token_id, 3000
    prompt = _prompt(tokenizer, "12+3=")
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=2, min_tokens=1)
    with eos_boosted(model, eos, 3.0):
        out = HFEngine(model, tokenizer).generate([prompt], n, sampling, seeds=[7])
        with torch.no_grad():
            first_logits = model(torch.tensor([prompt])).logits[0, -1].float()
            first = torch.tensor([c[0] for c in out.completion_ids])
            top = int(torch.bincount(first).argmax())
            second_probs = torch.softmax(model(torch.tensor([[*prompt, top]])).logits[0, -1].float(), -1)
    vocab = first_logits.shape[0]
    first_probs = torch.softmax(first_logits.index_fill(0, torch.tensor([eos]), float("-inf")), -1)
    second = torch.tensor([c[1] for c in out.completion_ids if c[0] == top])
    for drawn, probs in ((first, first_probs), (second, second_probs)):
        frequency = torch.bincount(drawn, minlength=vocab) / len(drawn)
        sigma = (probs * (1 - probs) / len(drawn)).sqrt()
        assert ((frequency - probs).abs() <= 5 * sigma + 1e-9).all()
    assert len(second) >= 300 and 0.2 < float(second_probs[eos]) < 0.9  # the EOS does compete at step 1


def _stop_ends_at(texts: list[str], stop: str, k: int) -> int | None:
    """Plain reference of vLLM's rule: the first token j >= k whose text completes ``stop`` (an occurrence that
    ends inside token j's text), or None."""
    for j in range(k, len(texts)):
        before, upto = "".join(texts[:j]), "".join(texts[: j + 1])
        if stop in upto[max(0, len(before) - len(stop) + 1) :]:
            return j
    return None


def test_a_stop_string_ends_a_completion_only_from_token_min_tokens_on(model_and_tokenizer):
    """vLLM's rule: a stop string counts when the token that completes it is token k or later (one completed before
    is passed over; one that starts before k and ends at k counts). The completion with stop strings is the one
    without them, cut where the plain reference says."""
    model, tokenizer = model_and_tokenizer
    engine, k = HFEngine(model, tokenizer), 4
    prompt = _prompt(tokenizer)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, min_tokens=k)
    free = engine.generate([prompt], 1, sampling, seeds=[5]).completion_ids[0]
    texts = [tokenizer.decode([token], skip_special_tokens=True) for token in free]
    early = next(t for t in texts[:k] if t)  # a character first seen before token k
    stops = [early, texts[k - 1] + texts[k]] if texts[k - 1] and texts[k] else [early]
    assert "".join(texts[:k]).count(early) >= 1
    for stop in stops:
        out = engine.generate([prompt], 1, replace(sampling, stop=[stop]), seeds=[5])
        end = _stop_ends_at(texts, stop, k)
        assert out.completion_ids[0] == (free if end is None else free[: end + 1])
        assert out.truncated == [end is None and len(free) == 12]
        if end is not None:
            assert len(out.completion_ids[0]) >= k + 1
    only_early = next((t for t in texts[:k] if t and t not in "".join(texts[k:])), None)
    if only_early is not None:  # completed before k only: never ends the completion
        out = engine.generate([prompt], 1, replace(sampling, stop=[only_early]), seeds=[5])
        assert out.completion_ids[0] == free


def test_on_policy_ratio_stays_one_and_old_logprobs_are_the_policys(tiny_model_dir, tmp_path):
    """Training with min_tokens 4 (of 6): the first iteration's ratio is 1 within 1e-6 (new and old log-probs are
    the trainer's own computation, the policy's distribution); the batch's old log-probs equal a full forward's
    unsuppressed log-probs and the engine's differ from them by log(1 - p_eos) before token 4 only."""
    module, data = make_pair(tiny_model_dir, lr=0.0, num_iterations=1)
    data.sampling = replace(data.sampling, min_tokens=4)
    capture = CaptureBatches()  # asks for old_logprobs: the scoring pass runs
    run = trainer(tmp_path, 2, callbacks=[capture], log_every_n_steps=1)
    run.fit(module, data)
    logged = run.logged_metrics
    assert float(logged["train/ratio_min"]) == pytest.approx(1.0, abs=1e-6)
    assert float(logged["train/ratio_max"]) == pytest.approx(1.0, abs=1e-6)
    eos = module.policy.config.eos_token_id
    for batch in capture.batches:
        mask = batch.completion_mask.bool()  # [N, L]
        assert (batch.completion_mask.sum(-1) >= 4).all()
        policy = full_log_softmax(module, batch, batch.logprob_temperature)  # [N, L]
        torch.testing.assert_close(batch.old_logprobs[mask], policy[mask], atol=1e-5, rtol=0)
        with torch.no_grad():
            position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = module.policy(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
            ).logits[:, batch.prompt_length - 1 : -1]  # [N, L, V]
        p_eos = torch.softmax(logits.float() / batch.logprob_temperature, -1)[..., eos]  # [N, L]
        expected_gap = torch.log1p(-p_eos)  # old - engine: log p - (log p - log(1 - p_eos))
        expected_gap[:, 4:] = 0.0
        torch.testing.assert_close(
            (batch.old_logprobs - batch.engine_logprobs)[mask], expected_gap[mask], atol=1e-5, rtol=0
        )
