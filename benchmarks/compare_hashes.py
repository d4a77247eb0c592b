"""The ``config_sha`` and ``design_sha`` of every (testbed, method) of ``compare_methods.py``, as a given tree computes
them: the check that a change to the code leaves the hashes of the methods already recorded alone (the records pair by
them; a changed hash would start new records instead of adding seeds to the old ones).

    git archive BASE_COMMIT | tar -x -C /tmp/base                                   # the tree before the change
    python benchmarks/compare_hashes.py --repo /tmp/base --write /tmp/before.json   # its hashes
    python benchmarks/compare_hashes.py --against /tmp/before.json                  # this tree's, compared

Each (testbed, method) is resolved by that tree's ``lit-gcpo fit --print_config`` (its runner's ``resolve``, with the
tree first on ``PYTHONPATH``), seed 0 (the seed is not hashed). ``--against`` prints both and exits 1 when a method of
the file hashes otherwise here; methods new in this tree are printed and not compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parent.parent


def load_runner(repo: Path) -> ModuleType:
    """``benchmarks/compare_methods.py`` of ``repo``, its ``lit-gcpo`` subprocesses importing ``repo``'s package."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    path = repo / "benchmarks" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location(f"compare_methods_{abs(hash(str(repo)))}", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def tree_hashes(repo: Path, scratch: Path) -> dict[str, list[str]]:
    """``{"testbed/method": [config_sha, design_sha]}`` of every testbed and method ``repo``'s runner plans."""
    runner = load_runner(repo)
    hashes = {}
    for testbed in runner.TESTBEDS:
        name = "compare_qa.yaml" if testbed == "qa" else "compare_arithmetic.yaml"
        base = yaml.safe_load((repo / "configs" / name).read_text())
        for method in runner.METHODS:
            if hasattr(runner, "runs_on") and not runner.runs_on(method, testbed):
                continue
            directory = scratch / testbed / method
            if hasattr(runner, "run_hashes"):  # the runner that knows methods with settings of their own
                hashes[f"{testbed}/{method}"] = list(runner.run_hashes(base, testbed, method, directory))
            else:  # the runner before them: the design is the run's config without the weighting
                resolved = runner.resolve(runner.run_config(base, testbed, method, 0, directory), directory)
                design = runner.config_sha(resolved, weighting=False)
                hashes[f"{testbed}/{method}"] = [runner.config_sha(resolved), design]
            print(f"{testbed}/{method}: {hashes[f'{testbed}/{method}']}", flush=True)
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(REPO), help="the tree whose runner computes the hashes")
    parser.add_argument("--write", default=None, help="write the hashes to this JSON file")
    parser.add_argument("--against", default=None, help="compare with the hashes of this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        hashes = tree_hashes(Path(args.repo).resolve(), Path(scratch))
    if args.write:
        Path(args.write).write_text(json.dumps(hashes, indent=1) + "\n")
    if not args.against:
        return 0
    before = json.loads(Path(args.against).read_text())
    changed = []
    print("| testbed/method | config_sha before | after | design_sha before | after | equal |")
    print("|---|---|---|---|---|---|")
    for key in sorted(hashes.keys() | before.keys()):
        old, new = before.get(key, ["—", "—"]), hashes.get(key, ["—", "—"])
        equal = "new" if key not in before else ("yes" if old == new else "NO")
        if equal == "NO":
            changed.append(key)
        print(f"| {key} | {old[0]} | {new[0]} | {old[1]} | {new[1]} | {equal} |")
    print(f"{len(changed)} of {len(before)} recorded methods hash otherwise: {', '.join(changed) or 'none'}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
