"""benchmarks/compare_report.py end to end on a synthetic results file: the numbers of its markdown against an
independent computation (stdlib statistics, plain loops over sign patterns and resamples), the README written only
between its markers, and both figures as PNG files."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import compare_report

METHODS = ("grpo", "seed_grpo", "seed_grpo_sf", "gcpo_bot", "gcpo_cd", "rd_only")
LIFT = {"grpo": 0.0, "seed_grpo": 0.0, "seed_grpo_sf": 0.01, "gcpo_bot": 0.03, "gcpo_cd": 0.0, "rd_only": 0.005}


def _synthetic_records() -> list[dict]:
    """arithmetic: 6 methods x 4 seeds of 20 steps and grpo x 2 seeds of 40 steps (a second design); noisy_hard:
    grpo and gcpo_bot x 3 seeds. The config_sha differs per testbed, method and steps, as the runner's does."""
    rng = np.random.default_rng(5)
    records = []
    plan = [
        ("arithmetic", 20, METHODS, 4),
        ("noisy_hard", 20, ("grpo", "gcpo_bot"), 3),
        ("arithmetic", 40, ("grpo",), 2),
    ]
    for testbed, steps, methods, seeds in plan:
        for method in methods:
            for seed in range(seeds):
                start = 0.2
                noise = rng.normal(0, 0.02, 2)
                middle, final = (round(float(start + x + LIFT[method]), 3) for x in (0.05 + noise[0], 0.12 + noise[1]))
                records.append({
                    "testbed": testbed, "method": method, "seed": seed, "steps": steps, "batch_size": 16,
                    "group_size": 8, "start_val_accuracy": start, "final_val_accuracy": final,
                    "val_curve": [[0, start], [steps // 2, middle], [steps, final]], "val_size": 1000,
                    "weight_std_mean": None if method == "grpo" else 0.2, "weight_min": 0.5, "weight_max": 1.5,
                    "truncated_frac_final": 0.0, "wall_s": 1.0, "commit": "abcdef1234567",
                    "config_sha": f"{testbed}-{method}-{steps}",
                    "config": "compare_arithmetic.yaml", "threads": 1, "finished_at": f"2026-12-06T10:0{seed}:00",
                })  # fmt: skip
    return records


def _cells(block: str, *first: str) -> list[str]:
    """The cells of the table row of ``block`` whose leading cells are ``first``."""
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and tuple(cells[: len(first)]) == first:
            return cells
    raise AssertionError(f"no row {first} in:\n{block}")


def _sign_flip_loop(d: list[float]) -> float:
    hits = sum(abs(sum(s * abs(x) for s, x in zip(signs, d, strict=True))) >= abs(sum(d)) - 1e-12
               for signs in itertools.product((-1, 1), repeat=len(d)))  # fmt: skip
    return hits / 2 ** len(d)


def _holm_loop(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * len(p), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def test_report_numbers_readme_markers_and_figures(tmp_path: Path) -> None:
    records = _synthetic_records()
    results = tmp_path / "compare_methods.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    readme = tmp_path / "README.md"
    markers = "<!-- begin compare_report -->\nold\n<!-- end compare_report -->"
    readme.write_text(f"# Title\n\nPre-registration.\n\n{markers}\nTail\n")
    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("# Other\n")
    results_md, figures = tmp_path / "RESULTS.md", tmp_path / "figures"
    results_md.write_text("# Benchmark results\n\n<!-- begin other -->\nkept\n<!-- end other -->\n")
    common = [str(results), "--results-md", str(results_md), "--figures", str(figures)]
    compare_report.main([*common, "--readme", str(readme)])
    compare_report.main([*common, "--readme", str(no_markers), "--no-write"])
    assert no_markers.read_text() == "# Other\n"

    text = results_md.read_text()
    assert "<!-- begin other -->\nkept\n<!-- end other -->" in text
    arithmetic = text.split("**arithmetic #1**")[1].split("**noisy_hard**")[0]
    noisy = text.split("**noisy_hard**")[1].split("**arithmetic #2**")[0]
    assert _cells(text.split("**arithmetic #2**")[1], "grpo")[1] == "2"  # the 40-step runs: not pooled, not paired

    def arm(testbed: str, method: str) -> list[dict]:
        runs = (r for r in records if (r["testbed"], r["method"], r["steps"]) == (testbed, method, 20))
        return sorted(runs, key=lambda r: r["seed"])

    def differences(testbed: str, a: str, b: str, value: Callable[[dict], float]) -> list[float]:
        return [value(x) - value(y) for x, y in zip(arm(testbed, a), arm(testbed, b), strict=True)]

    def final(record: dict) -> float:
        return record["final_val_accuracy"]

    def auc(record: dict) -> float:  # trapezoids over steps 0, 10, 20, divided by the span 20
        (s0, a0), (s1, a1), (s2, a2) = record["val_curve"]
        return ((s1 - s0) * (a0 + a1) / 2 + (s2 - s1) * (a1 + a2) / 2) / (s2 - s0)

    # per-method table
    for method in METHODS:
        runs = arm("arithmetic", method)
        finals = [r["final_val_accuracy"] for r in runs]
        gains = [r["final_val_accuracy"] - r["start_val_accuracy"] for r in runs]
        areas = [auc(r) for r in runs]
        cells = _cells(arithmetic, method)
        assert cells[1:4] == ["4", "0.200", f"{statistics.mean(finals):.3f} ± {statistics.stdev(finals):.3f}"]
        assert cells[4] == f"{statistics.mean(gains):+.3f} ± {statistics.stdev(gains):.3f}"
        assert cells[5] == f"{statistics.mean(areas):.3f} ± {statistics.stdev(areas):.3f}"
        assert cells[6:8] == (["—", "0.50 – 1.50"] if method == "grpo" else ["0.200", "0.50 – 1.50"])

    # primary contrasts, final accuracy and AUC: mean, exact sign-flip p, Holm over the 4, MDE, bootstrap bracket
    primary = [("gcpo_bot", "rd_only"), ("gcpo_cd", "rd_only"), ("seed_grpo_sf", "grpo"), ("gcpo_bot", "seed_grpo_sf")]
    detectable = {}
    for outcome, value in (("final accuracy", final), ("AUC", auc)):
        paired = [differences("arithmetic", a, b, value) for a, b in primary]
        mdes = [(stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * statistics.stdev(d) / 2 for d in paired]  # sqrt(4)
        detectable[outcome] = f"{outcome} {min(mdes):.3f} – {max(mdes):.3f} (4 seeds)"
        p = [_sign_flip_loop(d) for d in paired]
        for (a, b), d, p_raw, p_holm, mde in zip(primary, paired, p, _holm_loop(p), mdes, strict=True):
            cells = _cells(arithmetic, "primary", outcome, f"{a} - {b}")
            assert cells[3:5] == ["4", f"{statistics.mean(d):+.3f}"]
            assert cells[6:] == [f"{p_raw:.4f}", f"{p_holm:.4f}", f"{mde:.3f}"]
            # all 4^4 resamples of the 4 seeds: the reported ends lie between the 2nd-3rd and 97th-98th percentiles
            exact = [statistics.mean(d[i] for i in picks) for picks in itertools.product(range(4), repeat=4)]
            low, high = (float(x) for x in cells[5].strip("[]").split(","))
            assert np.quantile(exact, 0.02) - 5e-4 <= low <= np.quantile(exact, 0.03) + 5e-4
            assert np.quantile(exact, 0.97) - 5e-4 <= high <= np.quantile(exact, 0.98) + 5e-4
    assert f"of {detectable['final accuracy']}; {detectable['AUC']}, from" in arithmetic
    assert "no primary contrast pairs 2 seeds" in noisy
    # secondary: every method - grpo, Holm over the 5
    p = [_sign_flip_loop(differences("arithmetic", m, "grpo", final)) for m in METHODS[1:]]
    for method, p_raw, p_holm in zip(METHODS[1:], p, _holm_loop(p), strict=True):
        cells = _cells(arithmetic, "secondary", "final accuracy", f"{method} - grpo")
        assert cells[6:8] == [f"{p_raw:.4f}", f"{p_holm:.4f}"]

    # noisy_hard: no rd_only, so gcpo_bot - rd_only has no pair; gcpo_bot - grpo pairs 3 seeds
    assert _cells(noisy, "primary", "final accuracy", "gcpo_bot - rd_only")[3:] == ["0", "—", "—", "—", "—", "—"]
    d = differences("noisy_hard", "gcpo_bot", "grpo", final)
    assert _cells(noisy, "secondary", "final accuracy", "gcpo_bot - grpo")[3:5] == ["3", f"{statistics.mean(d):+.3f}"]

    # README: the block between the markers replaced, the rest untouched, figure paths relative to the README
    written = readme.read_text()
    assert written.startswith("# Title\n\nPre-registration.\n\n<!-- begin compare_report -->\n")
    assert written.endswith("<!-- end compare_report -->\nTail\n") and "\nold\n" not in written
    assert _cells(written.split("**noisy_hard**")[0], "gcpo_bot")[3] == _cells(arithmetic, "gcpo_bot")[3]
    assert _cells(arithmetic, "gcpo_bot")[9] == "`arithmetic-gcpo_bot-20`"
    assert "](figures/compare_curves.png)" in written and "](figures/compare_forest.png)" in text
    for name in ("compare_curves.png", "compare_forest.png"):
        data = (figures / name).read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
