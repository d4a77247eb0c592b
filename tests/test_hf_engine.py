"""The ``hf`` engine's sampling loop: greedy equals ``generate``, sampling follows the model's distribution,
each prompt's completions depend on its seed only (not on its batch), every end-of-sequence id stops, and the
full ``[n, T, V]`` logits are never held."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace

import pytest
import torch

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine, seeded_uniforms
from lit_gcpo.training.policy import load_policy, load_tokenizer
from lit_gcpo.training.scoring import CompletionScorer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def _splitmix64_reference(key: int, steps: int) -> list[float]:
    """SplitMix64 (Steele, Lea and Flood 2014) in plain Python integers, seeded with its own output of ``key``."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    state = mix(key & mask)
    draws = []
    for _ in range(steps):
        state = (state + 0x9E3779B97F4A7C15) & mask
        draws.append((mix(state) >> 11) / 2**53)
    return draws


def test_seeded_uniforms_are_splitmix64_streams_computed_as_tensors():
    keys = [0, 1, -5, 2**62 - 1, 123456789 * 1_000_003 + 7]
    uniforms = seeded_uniforms(torch.tensor(keys), 40)  # [5, 40]
    for row, key in enumerate(keys):
        assert uniforms[row].tolist() == _splitmix64_reference(key, 40)
    many = seeded_uniforms(torch.arange(2000), 50).flatten()  # 100,000 draws: uniform on [0, 1)
    assert float(many.min()) >= 0 and float(many.max()) < 1
    counts = torch.histc(many, bins=10, min=0, max=1)
    assert float(((counts - 10_000) ** 2 / 10_000).sum()) < 27.9  # chi-square, 9 dof, p = 0.001


def test_greedy_equals_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _ids(tokenizer, ["1+2=", "13+4=", "7*8-2="])
    out = HFEngine(model, tokenizer).generate(prompts, 2, SamplingConfig(temperature=0, max_new_tokens=10))
    for row, prompt in enumerate(prompts):
        reference = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )[0, len(prompt) :].tolist()
        assert (
            out.completion_ids[2 * row]
            == out.completion_ids[2 * row + 1]
            == reference[: len(out.completion_ids[2 * row])]
        )


def test_a_prompts_completions_depend_on_its_seed_not_its_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = HFEngine(model, tokenizer)
    prompts = _ids(tokenizer, ["1+2=", "13+4=", "7*8-2=", "9-3=", "5+5="])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    together = engine.generate(prompts, 3, sampling, seeds=[10, 11, 12, 13, 14])
    alone = engine.generate(prompts[2:3], 3, sampling, seeds=[12])
    reordered = engine.generate([prompts[4], prompts[2]], 3, sampling, seeds=[14, 12])
    assert together.completion_ids[6:9] == alone.completion_ids == reordered.completion_ids[3:6]
    other_seed = engine.generate(prompts[2:3], 3, sampling, seeds=[99])
    assert other_seed.completion_ids != alone.completion_ids
    assert len(set(map(tuple, together.completion_ids))) > 5  # the samples of a group differ


def test_sampled_tokens_follow_the_tempered_softmax(model_and_tokenizer):
    """First tokens of 3000 seeded samples against the model's probabilities: every frequency within 5 sigma."""
    model, tokenizer = model_and_tokenizer
    prompt = _ids(tokenizer, ["12+3="])[0]
    n = 3000
    out = HFEngine(model, tokenizer).generate([prompt], n, SamplingConfig(temperature=1.5, max_new_tokens=1), seeds=[7])
    counts = torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=model.config.vocab_size)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float() / 1.5, -1)
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * sigma + 1e-9).all()
    assert (counts > 0).sum() >= 5  # not degenerate: several tokens were drawn


def test_top_k_never_samples_outside_the_k_most_likely(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = _ids(tokenizer, ["12+3="])[0]
    out = HFEngine(model, tokenizer).generate([prompt], 300, SamplingConfig(temperature=2.0, top_k=3, max_new_tokens=1))
    with torch.no_grad():
        top = set(model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist())
    drawn = {c[0] for c in out.completion_ids}
    assert drawn <= top and len(drawn) > 1


def test_reported_logprobs_equal_the_trainers_recomputation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _ids(tokenizer, ["1+2=", "13+4="])
    out = HFEngine(model, tokenizer).generate(
        prompts, 2, SamplingConfig(temperature=0.8, max_new_tokens=6), seeds=[1, 2]
    )
    scorer = CompletionScorer(model, chunk_size=64)
    for row, completion in enumerate(out.completion_ids):
        ids = torch.tensor([prompts[row // 2] + completion])
        with torch.no_grad():
            expected = scorer(ids, torch.ones_like(ids), len(completion), temperature=0.8).logprobs[0]
        torch.testing.assert_close(torch.tensor(out.logprobs[row]), expected, atol=1e-5, rtol=0)


def test_embeddings_gathered_while_sampling_equal_the_scoring_pass(model_and_tokenizer):
    """The mean final hidden state over each completion's tokens, from the sampling loop's own forward passes (and
    one more for the last tokens), equals the scoring pass's; rows that stopped early and rows that ran to the limit,
    over several chunks. Asking for them changes no token."""
    model, tokenizer = model_and_tokenizer
    prompts = _ids(tokenizer, ["1+2=", "13+4=", "7*8="])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, stop=["1", "2"])
    engine = HFEngine(model, tokenizer, max_batch_size=4)  # 9 rows: chunks of 4, 4 and 1
    plain = engine.generate(prompts, 3, sampling, seeds=[1, 2, 3])
    out = engine.generate(prompts, 3, sampling, seeds=[1, 2, 3], with_embeddings=True)
    assert out.completion_ids == plain.completion_ids and plain.embeddings is None
    assert any(out.truncated) and not all(out.truncated)  # both kinds of row
    scorer = CompletionScorer(model, chunk_size=64)
    for row, completion in enumerate(out.completion_ids):
        ids = torch.tensor([prompts[row // 3] + completion])
        with torch.no_grad():
            hidden = scorer(ids, torch.ones_like(ids), len(completion), temperature=1.0, with_hidden=True).hidden[0]
        torch.testing.assert_close(out.embeddings[row], hidden.mean(0), atol=1e-5, rtol=0)


def test_rows_that_end_early_leave_the_batch_without_changing_any_row(model_and_tokenizer):
    """Rows leave the batch and its KV cache once they ended (and, with embeddings, once their last token was
    fed): each row's tokens, log-probs and embedding equal those of the row generated alone."""
    model, tokenizer = model_and_tokenizer
    prompts = _ids(tokenizer, ["1+2=", "13+4=", "7*8=", "9-3="])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10, stop=["1", "2"])
    engine = HFEngine(model, tokenizer)
    together = engine.generate(prompts, 3, sampling, seeds=[4, 5, 6, 7], with_embeddings=True)
    lengths = [len(c) for c in together.completion_ids]
    assert len(set(lengths)) > 2 and max(lengths) == 10  # rows left at several steps, some ran to the limit
    for index, prompt in enumerate(prompts):
        alone = engine.generate([prompt], 3, sampling, seeds=[4 + index], with_embeddings=True)
        rows = slice(3 * index, 3 * index + 3)
        assert alone.completion_ids == together.completion_ids[rows]
        for mine, theirs in zip(alone.logprobs, together.logprobs[rows], strict=True):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.embeddings, together.embeddings[rows], atol=1e-5, rtol=0)


def test_a_stop_string_ends_the_completion_where_its_text_completes(model_and_tokenizer):
    """A stop string spanning two tokens ends the completion at the token that completes it (kept in the text);
    one that never appears changes nothing. The tiny character tokenizer has no letters, which transformers'
    StopStringCriteria cannot read."""
    model, tokenizer = model_and_tokenizer
    prompt = _ids(tokenizer, ["13+4="])[0]
    engine = HFEngine(model, tokenizer)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    free = engine.generate([prompt], 1, sampling, seeds=[5]).completion_ids[0]
    text = [tokenizer.decode([token], skip_special_tokens=True) for token in free]
    assert len(free) == 12 and len(set(text)) > 3
    j = next(j for j in range(2, 11) if text[j] and text[j + 1])
    stop = text[j] + text[j + 1]  # two tokens
    first = next(i for i in range(12) if stop in "".join(text[: i + 1]))  # where the text first contains it
    out = engine.generate([prompt], 1, replace(sampling, stop=[stop, "(((("]), seeds=[5])
    assert out.completion_ids[0] == free[: first + 1] and out.truncated == [False]
    never = engine.generate([prompt], 1, replace(sampling, stop=["(((("]), seeds=[5])
    assert never.completion_ids[0] == free and never.truncated == [True]
    with pytest.raises(ValueError, match="empty string"):
        engine.generate([prompt], 1, SamplingConfig(temperature=0, max_new_tokens=4, stop=[""]))


def test_every_end_of_sequence_id_of_the_generation_config_stops(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = _ids(tokenizer, ["13+4="])[0]
    greedy = SamplingConfig(temperature=0, max_new_tokens=12)
    free = HFEngine(model, tokenizer).generate([prompt], 1, greedy).completion_ids[0]
    assert len(free) >= 4 and tokenizer.eos_token_id not in free[:3]
    second_eos = free[2]  # a chat model's <|im_end|>: listed by the generation config, not the tokenizer's EOS
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second_eos]
    try:
        engine = HFEngine(model, tokenizer)
        out = engine.generate([prompt], 1, greedy)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert engine.eos_token_ids == [tokenizer.eos_token_id, second_eos]
    stop = free.index(second_eos)
    assert out.completion_ids[0] == free[: stop + 1] and out.truncated == [False]


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from types import SimpleNamespace
    from transformers import LlamaConfig, LlamaForCausalLM
    from lit_gcpo.engines.base import SamplingConfig
    from lit_gcpo.engines.hf import HFEngine
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    engine = HFEngine(model, SimpleNamespace(eos_token_id=1, pad_token_id=0))
    engine.generate([[5, 6, 7]], 2, SamplingConfig(max_new_tokens=4))  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = engine.generate([[5, 6, 7, 8]] * 4, 4, SamplingConfig(max_new_tokens=64), seeds=[1, 2, 3, 4])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (after - before) / 1024, "tokens": sum(map(len, out.completion_ids))}))
    """
)


def test_generation_never_holds_the_full_vocabulary_logits(tmp_path):
    """16 sequences x 64 steps at V = 151,936: stacked float32 logits would be 16 * 64 * 151936 * 4 B = 594 MiB;
    per-step buffers are a few 16 x V float32 (9.3 MiB each: logits, scaled, log-softmax) and two float64 (18.6 MiB
    each: softmax, CDF), the KV cache ~0.1 MiB; with the allocator's slack 150-170 MiB were measured (one thread)."""
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["tokens"] > 16 * 32  # most sequences ran long (no early EOS at this vocabulary)
    assert measured["extra_mib"] < 200, measured  # a third of the stacked logits, whatever the number of steps


def test_a_small_policy_samples_on_one_thread_and_training_keeps_torchs_setting(model_and_tokenizer, monkeypatch):
    import lit_gcpo.engines.hf as hf

    model, tokenizer = model_and_tokenizer
    seen: list[int] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompt = _ids(tokenizer, ["1+2="])
        greedy = SamplingConfig(temperature=0, max_new_tokens=3)
        HFEngine(model, tokenizer).generate(prompt, 1, greedy)
        assert set(seen) == {1} and torch.get_num_threads() == 2  # a small policy; restored afterwards
        seen.clear()
        HFEngine(model, tokenizer, decode_threads=2).generate(prompt, 1, greedy)
        assert set(seen) == {2}
        seen.clear()
        monkeypatch.setattr(hf, "SMALL_POLICY_PARAMETERS", 10)  # as if the policy were large
        HFEngine(model, tokenizer).generate(prompt, 1, greedy)
        assert set(seen) == {2}
    finally:
        hook.remove()
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="decode_threads"):
        HFEngine(model, tokenizer, decode_threads=-1)


class ThreadCountSpy:
    """Stands in for ``torch.set_num_threads``: records ``(thread name, count)`` of every call, then makes it (or not,
    as vLLM's CPU worker does, which replaces it with a no-op)."""

    def __init__(self, monkeypatch, effective: bool = True) -> None:
        self.calls: list[tuple[str, int]] = []
        self.original, self.effective = torch.set_num_threads, effective
        monkeypatch.setattr(torch, "set_num_threads", self)

    def __call__(self, count: int) -> None:
        self.calls.append((threading.current_thread().name, count))
        if self.effective:
            self.original(count)


def test_a_generate_outside_the_main_thread_leaves_the_process_thread_count_alone(model_and_tokenizer, monkeypatch):
    """torch's thread count is the process's: a worker thread (data.off_policy's) that set it would change it under
    the trainer. The main thread's generate sets it (a small policy: one thread) and restores it."""
    model, tokenizer = model_and_tokenizer
    engine, greedy = HFEngine(model, tokenizer), SamplingConfig(temperature=0, max_new_tokens=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    spy = ThreadCountSpy(monkeypatch)
    seen: list[int] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        engine.generate(_ids(tokenizer, ["1+2="]), 1, greedy)
        assert spy.calls == [("MainThread", 1), ("MainThread", 2)] and set(seen) == {1}  # the control
        spy.calls.clear()
        worker = threading.Thread(target=engine.generate, args=(_ids(tokenizer, ["1+2="]), 1, greedy), name="worker")
        worker.start()
        worker.join()
        assert spy.calls == [] and torch.get_num_threads() == 2  # never called from the worker
        engine.decode_threads = 1  # an explicit count too
        worker = threading.Thread(target=engine.generate, args=(_ids(tokenizer, ["1+2="]), 1, greedy), name="worker")
        worker.start()
        worker.join()
        assert spy.calls == []
    finally:
        hook.remove()
        spy.original(before)


def test_a_thread_count_torch_ignores_is_warned_about_once_naming_the_option(model_and_tokenizer, monkeypatch, caplog):
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op when it starts: in such a process the
    sampling loop runs on torch's setting, said once, and the engine stops calling it."""
    model, tokenizer = model_and_tokenizer
    engine, greedy = HFEngine(model, tokenizer), SamplingConfig(temperature=0, max_new_tokens=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    spy = ThreadCountSpy(monkeypatch, effective=False)
    seen: list[int] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        with caplog.at_level("WARNING", logger="lit_gcpo.engines.hf"):
            first = engine.generate(_ids(tokenizer, ["1+2="]), 1, greedy)
            second = engine.generate(_ids(tokenizer, ["1+2="]), 1, greedy)
    finally:
        hook.remove()
        spy.original(before)
    assert first.completion_ids == second.completion_ids and set(seen) == {2}  # sampled on torch's 2 threads
    assert spy.calls == [("MainThread", 1)]  # tried once (a small policy: one thread), not restored, not again
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("data.engine_options.decode_threads: the hf engine's sampling loop samples on torch's 2")


def test_buffered_cache_gives_the_dynamic_caches_logits_bit_for_bit(model_and_tokenizer):
    """The engine's cache writes into buffers that grow by doubling; the attention must read the very numbers the
    concatenating DynamicCache gives it, through padded prompts and rows leaving the batch twice."""
    from transformers import DynamicCache

    from lit_gcpo.engines.kv_cache import BufferedLayer, buffered_cache

    model, _ = model_and_tokenizer
    generator = torch.Generator().manual_seed(0)
    n, width, steps = 6, 5, 9
    ids = torch.randint(4, model.config.vocab_size, (n, width), generator=generator)
    mask = torch.ones(n, width + steps, dtype=torch.long)
    mask[:2, :2] = 0  # two left-padded rows
    runs = []
    for cache in (DynamicCache(config=model.config), buffered_cache(model.config, width + steps)):
        logits, step, positions, rows = [], ids, (mask[:, :width].cumsum(-1) - 1).clamp(min=0), torch.arange(n)
        with torch.no_grad():
            for t in range(steps):
                out = model(
                    input_ids=step,
                    attention_mask=mask[rows, : width + t],
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1]
                logits.append(out)
                step, positions = out.argmax(-1, keepdim=True), positions[:, -1:] + 1
                if t in (3, 6):  # rows leave: 0, 2, 4 stay, then the first and the last of those
                    kept = torch.tensor([0, 2, 4]) if t == 3 else torch.tensor([0, 2])
                    cache.batch_select_indices(kept)
                    rows, step, positions = rows[kept], step[kept], positions[kept]
        runs.append(logits)
    assert all(isinstance(layer, BufferedLayer) for layer in cache.layers)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    layer = cache.layers[0]
    assert layer.get_seq_length() == width + steps - 1  # the prompt and 8 fed tokens; one column left
    two = layer.keys[:, :, :2].clone()
    with pytest.raises(RuntimeError, match="holds 14 columns; writing column 15 overflows it"):
        layer.update(two, two)


def test_rows_leave_together_without_changing_what_they_sample(model_and_tokenizer, monkeypatch):
    """Finished rows stay in the batch (fed a pad) until they are COMPACT_SHARE of it: the completions equal
    those of rows leaving at once (share 0) and of rows never leaving (share above 1)."""
    import lit_gcpo.engines.decoding as decoding

    model, tokenizer = model_and_tokenizer
    prompts = _ids(tokenizer, ["1+2=", "13+4=", "7*8=", "9-3="])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, stop=["1", "2"])
    outs = []
    for share in (0.0, decoding.COMPACT_SHARE, 2.0):
        monkeypatch.setattr(decoding, "COMPACT_SHARE", share)
        outs.append(HFEngine(model, tokenizer).generate(prompts, 4, sampling, seeds=[1, 2, 3, 4], with_embeddings=True))
    lengths = [len(c) for c in outs[0].completion_ids]
    assert len(set(lengths)) > 3 and min(lengths) < 6  # rows ended at many steps, some early
    for out in outs[1:]:
        assert out.completion_ids == outs[0].completion_ids and out.truncated == outs[0].truncated
        for mine, theirs in zip(out.logprobs, outs[0].logprobs, strict=True):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.embeddings, outs[0].embeddings, atol=1e-5, rtol=0)


def test_buffered_layer_grows_by_doubling_up_to_its_capacity_and_keeps_what_it_holds():
    from lit_gcpo.engines.kv_cache import BufferedLayer

    layer = BufferedLayer(capacity=10)
    written = torch.arange(2 * 1 * 10 * 4, dtype=torch.float32).reshape(2, 1, 10, 4)  # [rows, heads, T, dim]
    held = []
    for start, end in [(0, 3), (3, 4), (4, 7), (7, 8), (8, 10)]:
        keys, values = layer.update(written[:, :, start:end], -written[:, :, start:end])
        held.append(layer._key_buffer.shape[2])
        assert torch.equal(keys, written[:, :, :end]) and torch.equal(values, -written[:, :, :end])
    # 3 columns (the prompt), doubled to 6 for the 4th, to 12 for the 7th but capped at the capacity 10
    assert held == [3, 6, 10, 10, 10]
    with pytest.raises(RuntimeError, match="holds 10 columns; writing column 11 overflows it"):
        layer.update(written[:, :, :1], written[:, :, :1])
