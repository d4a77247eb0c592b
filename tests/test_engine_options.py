"""``data.engine_options`` is typed: its fields are the engines' constructor options, each engine gets its own
options only, and another engine's option is refused by name."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.engines.options import EngineOptions

ROOT = Path(__file__).parents[1]


def _vllm_constructor_options() -> list[str]:
    """``VLLMEngine.__init__``'s options, read from the source (importing it sets vLLM's environment)."""
    tree = ast.parse((ROOT / "lit_gcpo/engines/vllm.py").read_text())
    engine = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "VLLMEngine")
    init = next(node for node in engine.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    return [arg.arg for arg in init.args.args][3:]  # after self, policy, tokenizer


def test_fields_are_the_engines_constructor_options():
    hf = list(inspect.signature(HFEngine.__init__).parameters)[3:]  # after self, policy, tokenizer
    assert EngineOptions.names("hf") == hf
    assert EngineOptions.names("vllm") == _vllm_constructor_options()


def test_only_set_options_reach_the_engine():
    assert EngineOptions().for_engine("vllm") == {}
    options = EngineOptions(dtype="float32", max_model_len=256, enable_prefix_caching=False)
    assert options.for_engine("vllm") == {"dtype": "float32", "max_model_len": 256, "enable_prefix_caching": False}
    assert EngineOptions(decode_threads=2).for_engine("hf") == {"decode_threads": 2}


def test_another_engines_option_is_refused_by_name():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: not options of the 'hf' engine"):
        EngineOptions(gpu_memory_utilization=0.3).for_engine("hf")
    with pytest.raises(ValueError, match=r"decode_threads: not options of the 'vllm' engine"):
        RolloutDataModule(engine="vllm", engine_options={"decode_threads": 1})


def test_datamodule_takes_a_dict_from_python():
    data = RolloutDataModule(engine="vllm", engine_options={"dtype": "float32", "max_model_len": 256})
    assert data.engine_options == EngineOptions(dtype="float32", max_model_len=256)
