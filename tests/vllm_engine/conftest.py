"""One vLLM engine per test session, on a tiny character Llama built offline.

Every test here is marked ``vllm`` and needs the separate venv of ``scripts/setup_vllm_cpu.sh``:

    OMP_WAIT_POLICY=PASSIVE .venv-vllm/bin/python -m pytest tests/vllm_engine -m vllm -x -q

Without vllm installed the tests are skipped. The engine is in-process (the engine module disables
vLLM's multiprocessing), so nothing is spawned and pytest's ``__main__`` is never re-imported.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective if torch is not imported yet

import pytest
import torch

# This folder is itself importable as a namespace package "vllm" (tests/ is on sys.path under pytest):
# only a real package, with a file behind it, counts.
_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _SPEC is not None and _SPEC.origin is not None
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vllm is not installed (run scripts/setup_vllm_cpu.sh, use .venv-vllm)")
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from lit_gcpo.assets.tiny_model import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def policy():
    """The tiny tied-embedding Llama (head_dim 32: vLLM's CPU attention has no kernel for 16).

    ``initializer_range`` 0.2 instead of 0.02 spreads the logits, so greedy decoding has no near-ties
    that a 1e-6 numerical difference between vLLM and transformers could flip.
    """
    from lit_gcpo.assets.tiny_model import build_tiny_config, build_tiny_model

    config = build_tiny_config(hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=512)
    config.initializer_range = 0.2
    model = build_tiny_model(config, seed=0).float()
    model.train()
    return model


@pytest.fixture(scope="session")
def model_dir(policy, tokenizer, tmp_path_factory) -> str:
    """The session policy (as it was when first asked for) and its tokenizer, saved where a fit loads them from."""
    path = tmp_path_factory.mktemp("session-policy")
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def engine_and_rng_states(policy, tokenizer):
    """The shared VLLMEngine (start-up 20-50 s on a 2-core CPU) and the caller's torch RNG state before and
    after creating it (vLLM reseeds the process at start-up). Tests leave its weights as they found them."""
    from lit_gcpo.engines.vllm import VLLMEngine

    torch.manual_seed(4321)
    before = torch.get_rng_state()
    vllm_engine = VLLMEngine(policy, tokenizer, dtype="float32", max_model_len=512, seed=0)
    after = torch.get_rng_state()
    yield vllm_engine, (before, after)
    vllm_engine.close()


@pytest.fixture(scope="session")
def engine(engine_and_rng_states):
    return engine_and_rng_states[0]


@pytest.fixture()
def restore_policy(policy, engine):
    """Put the policy's initial weights back into the policy and the engine after a test that trains."""
    saved = {name: tensor.detach().clone() for name, tensor in policy.state_dict().items()}
    yield
    policy.load_state_dict(saved)
    engine.sync_weights(policy.state_dict().items(), force=True)


@pytest.fixture(scope="session")
def recompute():
    """The transformers reference for engine log-probs (a fixture, so test modules need not import this one)."""
    return recompute_logprobs


def recompute_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    """Independent reference: ``log_softmax(logits / T)`` of ``model`` at each completion token. [T]"""
    ids = torch.tensor([prompt + completion])  # [1, P+T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [P+T, V]
    scaled = logits[len(prompt) - 1 : -1] / temperature  # [T, V], position t predicts token t+1
    return torch.log_softmax(scaled, dim=-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
