"""Step time with a reward function stuck in a CPU loop: in a thread (before) vs in its own process (now).

A "step" here is what the trainer does around the rewards: score a batch of 32 completions with
``math_accuracy`` + a user reward, then forward and backward the embedded tiny policy on 32 sequences of
48 tokens, 3 times. The user reward spins forever on every 3rd batch (``runaway_reward.spin_some``), with
a 1 s timeout. Three runs of ``--steps`` steps each:

- ``none``: a well-behaved user reward (the baseline);
- ``thread``: the runaway reward called in a daemon thread (how user rewards ran before): a timed-out call
  keeps spinning and holding the interpreter;
- ``process``: the runaway reward in a ``ProcessReward`` (how they run now): a timed-out call's process is
  killed and replaced.

    python benchmarks/bench_runaway_reward.py --steps 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_header, write_results_section
from runaway_reward import spin_some, well_behaved

from lit_gcpo.rewards import ProcessReward, RewardSet, RewardTerm, math_accuracy
from lit_gcpo.rewards.combine import MAX_STUCK_CALLS


def measure(rewards: RewardSet, steps: int) -> list[tuple[float, bool]]:
    """``(seconds, whether the user reward timed out)`` of each step."""
    from lit_gcpo.training.policy import load_policy

    policy = load_policy("lit-gcpo/tiny-arith")
    ids = torch.randint(0, policy.config.vocab_size, (32, 48), generator=torch.Generator().manual_seed(0))
    completions = [f"so \\boxed{{{i % 7}}}" for i in range(32)]
    rows = [{"answer": str(i % 5)} for i in range(32)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        scores = rewards.score(["q"] * 32, completions, rows)
        for _ in range(3):
            policy(input_ids=ids, labels=ids).loss.backward()
        times.append((time.perf_counter() - start, scores.metrics["reward/user_timeouts"] > 0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {
        "none": RewardSet([RewardTerm("math_accuracy", math_accuracy), RewardTerm("user", well_behaved)], args.timeout),
        # (0: no stop after 10 unusable batches, which a stuck thread now triggers; the old behaviour ran on)
        "thread": RewardSet(
            [RewardTerm("math_accuracy", math_accuracy), RewardTerm("user", spin_some)],
            args.timeout,
            max_unusable_batches=0,
        ),
        "process": RewardSet(
            [
                RewardTerm("math_accuracy", math_accuracy),
                RewardTerm("user", ProcessReward("runaway_reward:spin_some", args.timeout)),
            ],
            args.timeout,
        ),
    }
    results = {}
    for name in ("none", "process", "thread"):  # thread last: its stuck threads never end
        steps = measure(runs[name], args.steps)
        quiet = [seconds for seconds, timed_out in steps if not timed_out]
        timed = [seconds for seconds, timed_out in steps if timed_out]
        results[name] = (
            statistics.median(seconds for seconds, _ in steps),
            statistics.median(quiet) if quiet else float("nan"),
            statistics.median(timed) if timed else float("nan"),
            sum(seconds for seconds, _ in steps),
            runs[name].timeouts["user"],
        )
        print(name, results[name], flush=True)
    base = results["none"][1]
    lines = [
        "## A runaway reward function: thread vs process (bench_runaway_reward.py)",
        "",
        run_header(threads=1),
        f"{args.steps} steps; a step = score 32 completions (math_accuracy + a user reward, timeout "
        f"{args.timeout:g} s) + 3 forward/backward passes of the embedded tiny policy on [32, 48] tokens. The "
        "runaway user reward (`benchmarks/runaway_reward.py`) spins forever on every 3rd call. In a thread, "
        f"at most {MAX_STUCK_CALLS} stuck calls are kept (later calls are skipped), each spinning for the rest "
        "of the run; in a process, a timed-out call's process is killed and a new one (importing the reward's "
        "module again) serves the next call.",
        "",
        "| user reward | median step (s) | median step without a timeout (s) | median step with a timeout (s) "
        "| whole run (s) | timed-out calls | steps without a timeout vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "none": "well-behaved (baseline)",
        "thread": "runaway, in a thread (before)",
        "process": "runaway, in its own process (now)",
    }
    for name in ("none", "thread", "process"):
        median, quiet, timed, total, timeouts = results[name]
        lines.append(
            f"| {labels[name]} | {median:.3f} | {quiet:.3f} | {timed:.3f} | {total:.1f} | {timeouts} "
            f"| {quiet / base:.2f}x |"
        )
    lines += [
        "",
        "A step whose call times out costs the timeout either way; in a thread the stuck calls then compete for "
        "the interpreter in every later step, in a process they are gone once killed.",
    ]
    write_results_section("bench_runaway_reward", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
