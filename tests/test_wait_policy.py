"""``lit-gcpo``'s ``OMP_WAIT_POLICY``: PASSIVE unless the user set it, decided without importing torch (OpenMP reads
the variable once, at torch's first import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lit_gcpo.running.wait_policy import choose_wait_policy, wait_policy_variables


def test_passive_by_default_and_never_over_the_users_value() -> None:
    assert choose_wait_policy({}) == (
        "PASSIVE",
        "PASSIVE: lit-gcpo's default (lit_gcpo.running.wait_policy has the measurements)",
    )
    assert wait_policy_variables({"PATH": "/bin"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    for value in ("ACTIVE", "PASSIVE", ""):
        assert choose_wait_policy({"OMP_WAIT_POLICY": value}) == (None, f"OMP_WAIT_POLICY={value} from the environment")
        assert wait_policy_variables({"OMP_WAIT_POLICY": value}) == {}


def _after_importing_the_cli(env: dict[str, str]) -> dict:
    """What a fresh interpreter sees after ``import lit_gcpo.running.cli``: the policy OpenMP will read and whether
    torch was imported before the CLI set it (then OpenMP would have read the environment already)."""
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
    seen = _after_importing_the_cli(env)
    assert seen == {"policy": "PASSIVE", "torch_first": False}
    assert _after_importing_the_cli({**env, "OMP_WAIT_POLICY": "ACTIVE"})["policy"] == "ACTIVE"
