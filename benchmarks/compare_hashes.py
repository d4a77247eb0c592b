"""The ``config_sha`` and ``design_sha`` of every (testbed, method) of ``compare_methods.py``, as a given tree computes
them: the check that a change to the code leaves the hashes of the methods already recorded alone (the records pair by
them; a changed hash would start new records instead of adding seeds to the old ones).

    git archive BASE_COMMIT | tar -x -C /tmp/base                                   # the tree before the change
    python benchmarks/compare_hashes.py --repo /tmp/base --write /tmp/before.json   # its hashes
    python benchmarks/compare_hashes.py --against /tmp/before.json                  # this tree's, compared
    python benchmarks/compare_hashes.py --compare /tmp/before.json /tmp/after.json  # two files written earlier

Each (testbed, method) is resolved by that tree's ``lit-gcpo fit --print_config`` (its runner's ``resolve``, with the
tree first on ``PYTHONPATH``), seed 0 (the seed is not hashed). ``--against`` / ``--compare`` print both, write the
table to ``benchmarks/RESULTS.md`` (section ``compare_hashes``; not with ``--no-write``) and exit 1 when a method of
the earlier file hashes otherwise; methods new in the later one are listed and not compared.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_header, write_results_section

REPO = Path(__file__).resolve().parent.parent


def load_runner(repo: Path) -> ModuleType:
    """``benchmarks/compare_methods.py`` of ``repo``, its ``lit-gcpo`` subprocesses importing ``repo``'s package."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    path = repo / "benchmarks" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location(f"compare_methods_{abs(hash(str(repo)))}", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def tree_hashes(repo: Path, scratch: Path, only: set[str] | None = None) -> dict[str, list[str]]:
    """``{"testbed/method": [config_sha, design_sha]}`` of every testbed and method ``repo``'s runner plans (those
    named in ``only``, when given)."""
    runner = load_runner(repo)
    hashes = {}
    for testbed in runner.TESTBEDS:
        name = "compare_qa.yaml" if testbed == "qa" else "compare_arithmetic.yaml"
        base = yaml.safe_load((repo / "configs" / name).read_text())
        for method in runner.METHODS:
            if hasattr(runner, "runs_on") and not runner.runs_on(method, testbed):
                continue
            if only is not None and f"{testbed}/{method}" not in only:
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


def comparison(before: dict[str, list[str]], after: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The table of both hashes of every (testbed, method), and the recorded methods whose hashes changed."""
    lines = [
        "| testbed/method | config_sha before | after | design_sha before | after | equal |",
        "|---|---|---|---|---|---|",
    ]
    changed = []
    for key in sorted(after.keys() | before.keys()):
        old, new = before.get(key, ["—", "—"]), after.get(key, ["—", "—"])
        equal = "new" if key not in before else "missing" if key not in after else "yes" if old == new else "NO"
        if equal in ("NO", "missing"):
            changed.append(key)
        lines.append(f"| {key} | {old[0]} | {new[0]} | {old[1]} | {new[1]} | {equal} |")
    return lines, changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(REPO), help="the tree whose runner computes the hashes")
    parser.add_argument("--write", default=None, help="write the hashes to this JSON file")
    parser.add_argument("--against", default=None, help="compare this tree's hashes with those of this JSON file")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("BEFORE", "AFTER"), help="two JSON files")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--all", action="store_true", help="with --against: also the methods new in this tree")
    parser.add_argument("--note", default="", help="what the two trees are, for RESULTS.md")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(path).read_text()) for path in args.compare)
    else:
        earlier = json.loads(Path(args.against).read_text()) if args.against and not args.all else None
        with tempfile.TemporaryDirectory() as scratch:
            after = tree_hashes(Path(args.repo).resolve(), Path(scratch), None if earlier is None else set(earlier))
        if args.write:
            Path(args.write).write_text(json.dumps(after, indent=1) + "\n")
        if not args.against:
            return 0
        before = json.loads(Path(args.against).read_text())
    lines, changed = comparison(before, after)
    verdict = f"{len(changed)} of {len(before)} methods of the earlier tree hash otherwise (or are missing): "
    verdict += f"{', '.join(changed) or 'none'}."
    print("\n".join([*lines, verdict]))
    if not args.no_write:
        section = [
            "## The comparison's hashes before and after a change (compare_hashes.py)", "", run_header(),
            "config_sha and design_sha of every (testbed, method) of compare_methods.py, resolved by each tree's own "
            "runner (before: the tree the change starts from; after: the changed tree). The records pair by them: "
            f"a changed hash would start new records instead of adding seeds to the old ones. {args.note}".rstrip(),
            "", *lines, "",
            verdict,
        ]  # fmt: skip
        write_results_section("compare_hashes", section)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
