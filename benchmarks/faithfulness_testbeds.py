"""What the faithfulness diagnostic samples and scores, and which compared policies it diagnoses.

``benchmarks/uncertainty_faithfulness.py`` diagnoses one policy on one ``Setting``: the prompts, the reward, the
sampling and the way the signals are computed. This module builds them.

For a testbed of ``compare_methods.py`` (``comparison_setting``) the setting is read from the run config the runner
builds, ``compare_methods.run_config`` on the config file the run's record names (``configs/compare_arithmetic.yaml``
or ``configs/compare_qa.yaml``), without the method's own settings: the noisy arms' noise (``NOISY_SHARE``,
``NOISE_RATE``, ``TESTBEDS[testbed]``), the noisy reward and the QA reward come from there, never copied.

- prompts: the training source on ``noisy_hard`` / ``noisy_easy`` (the noise is in the training prompts; the
  noisy-versus-clean weight table needs them), the validation source elsewhere (``arithmetic``: the 300
  two-operand problems the comparison validates on; ``qa``: its generated validation prompts), rendered with the
  config's template. With more rows than ``--num-prompts``, a subset drawn with the diagnostic's seed (the same for
  every method of a testbed, so the rows pair): the first rows of the validation file are ``0+0=``, ``0+1=``, ...;
- reward: ``data.rewards`` with ``data.reward_weights`` (noisy arms: the coin-flip reward at weight 1 and the
  true accuracy at 0, so k is the number of completions the training reward scored 1);
- sampling: ``data.sampling`` (temperature, length limit, stop strings; the command line may override the first
  two), ``data.batch_size`` prompts at a time: a chunk is weighted as one training step (centring, scale);
- signals: the uncertainty callback's ``clustering`` (``answer``, or ``embedding`` with its ``tau``) and
  ``embeddings`` (the policy's hidden states, ``batch``, or a sentence model: ``qa``'s all-MiniLM-L6-v2).

A method's own settings are left out: a label-free method trained on no gold reward, but V is GRPO's gradient
variance under the testbed's reward for every policy, so the rows of a testbed compare like with like.

Which policies (``compare_targets``): the records of ``benchmarks/results/compare_methods.jsonl`` (testbed,
method, seed, config_sha, design_sha, config file), not the paths; a record's final policy is
``<compare dir>/<config_sha>/<testbed>/<method>/seed<seed>/policy`` (``model.export_dir`` of the run). The design
is chosen by ``design_sha`` prefixes, or by default the issue-20 design: the records made from the commits of the
tags ``compare-v1`` (arithmetic, noisy_hard, noisy_easy; written before design_sha existed) and ``compare-qa-v1``
(qa). Before anything runs, the run's own ``fit_config.yaml`` is compared with the setting compare_methods.py builds
for its method (with the method's own settings, such as a label-free run's rewards); a difference (a config or
constant changed since the run) is refused, naming the testbed and the setting.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import CALLBACK, NOISY_TESTBEDS, REPO, TESTBEDS, run_config

CONFIGS = REPO / "configs"
ISSUE_20_COMMITS = {
    "821fb542f78ee0c06923d199c6684386b71df181": "compare-v1",
    "65c9619e1de4dcacf099007ea5cbc51b591e5976": "compare-qa-v1",
}
"""The commits the issue-20 comparison ran from (README, "Method comparison"), with their tags."""


def _default(target: Any, name: str) -> Any:
    """The default of parameter ``name`` of ``target``'s signature (the class's own, not a copy of it)."""
    return inspect.signature(target).parameters[name].default


@dataclass(frozen=True)
class Setting:
    """What one diagnosis samples and scores (module docstring).

    Attributes:
        label: the testbed (or prompts file) named in the tables.
        source: ``{"class_path", "init_args"}`` of the prompt source (a ``PromptSource``).
        template, system, chat: how a row becomes a prompt (``lit_gcpo.data.templates.PromptRenderer``).
        rewards, reward_weights: ``RewardSet.from_names``'s arguments.
        sampling: ``SamplingConfig`` fields (without the seed).
        clustering, embeddings, tau: the uncertainty callback's options of the same names.
        noisy: the rows carry ``noise_rate`` (a noisy testbed): the weights on noisy and clean prompts are compared.
        batch_size: prompts per chunk, sampled and weighted together as one training step (``data.batch_size``).
        required: row fields that must be present and non-empty.
    """

    label: str
    source: dict[str, Any]
    template: str
    rewards: list[str]
    reward_weights: list[float] | None
    sampling: dict[str, Any]
    clustering: str
    embeddings: str
    tau: float
    noisy: bool = False
    batch_size: int = 32
    system: str | None = None
    chat: str = "auto"
    required: tuple[str, ...] = ()

    def load_rows(self, num_prompts: int, seed: int) -> list[dict[str, Any]]:
        """The source's rows; with more than ``num_prompts``, a subset drawn with ``seed``, in the source's order."""
        module, _, name = self.source["class_path"].rpartition(".")
        init_args = dict(self.source.get("init_args") or {})
        if "files" in init_args:  # the configs name files relative to the repository, as the runner runs there
            files = init_args["files"]
            paths = [files] if isinstance(files, str) else files
            resolved = [str(REPO / p) if not Path(p).is_absolute() and (REPO / p).exists() else p for p in paths]
            init_args["files"] = resolved[0] if isinstance(files, str) else resolved
        rows = getattr(importlib.import_module(module), name)(**init_args).load()
        if len(rows) > num_prompts:
            rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), num_prompts))]
        for index, row in enumerate(rows):
            missing = [field for field in self.required if row.get(field) in (None, "")]
            if missing:
                raise ValueError(f"{self.label}: row {index} needs non-empty {', '.join(map(repr, missing))}")
        return rows


def setting_of_config(testbed: str, config: Mapping[str, Any]) -> Setting:
    """The ``Setting`` of a comparison run's config (module docstring: which source, reward, sampling, signals)."""
    from lit_gcpo.callbacks import UncertaintyCallback
    from lit_gcpo.data.datamodule import RolloutDataModule

    data = config["data"]
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    callback = next((c.get("init_args") or {} for c in callbacks if c.get("class_path") == CALLBACK), {})

    def option(name: str) -> Any:
        return callback.get(name, _default(UncertaintyCallback, name))

    weights = data.get("reward_weights")
    return Setting(
        label=testbed,
        source=copy.deepcopy(data["train"] if testbed in NOISY_TESTBEDS else data["val"]),
        template=data.get("template", _default(RolloutDataModule, "template")),
        system=data.get("system", _default(RolloutDataModule, "system")),
        chat=data.get("chat", _default(RolloutDataModule, "chat")),
        rewards=list(data["rewards"]),
        reward_weights=None if weights is None else [float(w) for w in weights],
        sampling=dict(data.get("sampling") or {}),
        clustering=option("clustering"),
        embeddings=option("embeddings"),
        tau=float(option("tau")),
        noisy=testbed in NOISY_TESTBEDS,
        batch_size=int(data.get("batch_size", _default(RolloutDataModule, "batch_size"))),
    )


def comparison_setting(testbed: str, config_file: Path, method: str | None = None) -> Setting:
    """The ``Setting`` of ``testbed`` of compare_methods.py on its base config ``config_file``: without any method's
    own settings (what the diagnostic uses), or with ``method``'s (what that method's run trained on)."""
    if testbed not in TESTBEDS:
        raise ValueError(
            f"testbed {testbed!r} is not a testbed of compare_methods.py (TESTBEDS: {', '.join(TESTBEDS)}): "
            "the diagnostic cannot tell which prompts and reward it trained on"
        )
    base = yaml.safe_load(Path(config_file).read_text())
    config = run_config(base, testbed, method or "grpo", 0, Path("unused"), with_settings=method is not None)
    return setting_of_config(testbed, config)


def legacy_setting(testbed: str, prompts: str | None, num_prompts: int, seed: int) -> Setting:
    """The single-policy mode's setting (``--testbed arithmetic|noisy`` or ``--prompts FILE``), as before the
    comparison's testbeds: temperature 1.0, 24 tokens, no stop string, chunks of 32 prompts, answer clusters, the
    policy's embeddings."""
    sampling = {"temperature": 1.0, "max_new_tokens": 24}
    common = {"template": "{prompt}", "sampling": sampling, "clustering": "answer", "embeddings": "batch", "tau": 0.9}
    if prompts is not None:
        source = {"class_path": "lit_gcpo.data.sources.LocalFiles", "init_args": {"files": prompts}}
        return Setting(prompts, source, rewards=["math_accuracy"], reward_weights=None, required=("prompt", "answer"),
                       **common)  # fmt: skip
    if testbed == "noisy":  # the noisy task's defaults (noise on three- and four-operand prompts, rate 0.25)
        init_args = {"split": "train", "num_train": 5000, "seed": seed, "limit": num_prompts}
        source = {"class_path": "lit_gcpo.tasks.noisy_arithmetic.NoisyArithmeticTask", "init_args": init_args}
        rewards = ["lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy"]
        return Setting("noisy", source, rewards=rewards, reward_weights=None, noisy=True, **common)
    if testbed != "arithmetic":
        raise ValueError(f"--testbed {testbed!r}: the single-policy mode knows arithmetic and noisy")
    # the task's validation problems of its default mix (validation rows do not depend on num_train)
    init_args = {"split": "validation", "num_train": 1, "num_val": num_prompts, "seed": seed}
    source = {"class_path": "lit_gcpo.tasks.arithmetic.ArithmeticTask", "init_args": init_args}
    return Setting("arithmetic", source, rewards=["math_accuracy"], reward_weights=None, **common)


@dataclass(frozen=True)
class Target:
    """One final policy of the comparison and the setting of its testbed."""

    testbed: str
    method: str
    seed: int
    config_sha: str
    policy: Path
    setting: Setting


def design_records(records: Sequence[Mapping[str, Any]], design: Sequence[str] | None) -> list[Mapping[str, Any]]:
    """The records of the chosen design: ``design_sha`` starting with one of ``design``, or (None) the issue-20
    design's (``ISSUE_20_COMMITS``)."""
    if design is None:
        chosen = [r for r in records if str(r.get("commit", "")).split("+")[0] in ISSUE_20_COMMITS]
        what = f"the issue-20 design (commits {', '.join(f'{c[:9]} ({t})' for c, t in ISSUE_20_COMMITS.items())})"
    else:
        chosen = [r for r in records if any(str(r.get("design_sha") or "").startswith(p) for p in design)]
        what = f"--design {' '.join(design)}"
    if not chosen:
        known = sorted({str(r["design_sha"]) for r in records if r.get("design_sha")})
        raise ValueError(f"{what}: no record of the results file has it (design_sha recorded: {', '.join(known)})")
    return chosen


def compare_targets(
    records: Sequence[Mapping[str, Any]],
    compare_dir: Path,
    design: Sequence[str] | None = None,
    seed: int = 0,
    testbeds: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    configs: Path = CONFIGS,
) -> list[Target]:
    """The final policies to diagnose, one per (testbed, method) of the design's runs of ``seed`` (``chosen_runs``),
    each with its testbed's setting, after checking that every policy exists and that every run's own config
    matches the setting (``check_run``); a missing config file or policy is refused, naming the run."""
    targets, missing, settings = [], [], {}
    for (testbed, method), record in chosen_runs(records, design, seed, testbeds, methods).items():
        config_file = configs / str(record.get("config"))
        if not record.get("config") or not config_file.is_file():
            raise ValueError(
                f"testbed {testbed}, {method}: the record's config {record.get('config')!r} is not in {configs}"
            )
        if (testbed, config_file) not in settings:
            settings[testbed, config_file] = comparison_setting(testbed, config_file)
        setting = settings[testbed, config_file]
        run_dir = Path(compare_dir) / record["config_sha"] / testbed / method / f"seed{seed}"
        if not (run_dir / "policy" / "config.json").is_file():
            missing.append(f"{testbed} {method} seed {seed}: {run_dir / 'policy'}")
            continue
        check_run(comparison_setting(testbed, config_file, method), run_dir / "fit_config.yaml")
        targets.append(Target(testbed, method, seed, record["config_sha"], run_dir / "policy", setting))
    if missing:
        raise FileNotFoundError(f"--compare-dir {compare_dir}: no exported policy for\n  " + "\n  ".join(missing))
    return targets


def chosen_runs(
    records: Sequence[Mapping[str, Any]],
    design: Sequence[str] | None,
    seed: int,
    testbeds: Sequence[str] | None,
    methods: Sequence[str] | None,
) -> dict[tuple[str, str], Mapping[str, Any]]:
    """The record of each (testbed, method) of the design's runs of ``seed``, in the order of ``TESTBEDS`` and then
    of the records; ``testbeds`` / ``methods`` (None: all the design has) narrow them. Refuses, naming the option or
    testbed: a seed or design without runs, a testbed compare_methods.py does not know, a testbed or method asked
    for that the design has no run of, a (testbed, method) with runs of two config_sha."""
    chosen = [r for r in design_records(records, design) if int(r["seed"]) == seed]
    if not chosen:
        raise ValueError(f"--policy-seed {seed}: the design has no run of that seed")
    unknown = sorted({str(r["testbed"]) for r in chosen} - set(TESTBEDS))
    if unknown:
        raise ValueError(
            f"testbed {unknown[0]!r} of the records is not a testbed of compare_methods.py: cannot diagnose"
        )
    for option, asked, found in (
        ("--testbeds", testbeds, {r["testbed"] for r in chosen}),
        ("--methods", methods, {r["method"] for r in chosen if testbeds is None or r["testbed"] in testbeds}),
    ):
        absent = [name for name in asked or () if name not in found]
        if absent:
            raise ValueError(f"{option} {' '.join(absent)}: the design has no run of seed {seed} of it")
    runs: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for record in sorted(chosen, key=lambda r: list(TESTBEDS).index(r["testbed"])):
        if (testbeds is None or record["testbed"] in testbeds) and (methods is None or record["method"] in methods):
            runs.setdefault((record["testbed"], record["method"]), {})[record["config_sha"]] = record
    for (testbed, method), by_sha in runs.items():
        if len(by_sha) > 1:
            raise ValueError(f"testbed {testbed}, method {method}: seed {seed} has runs of config_sha {sorted(by_sha)}")
    return {key: next(iter(by_sha.values())) for key, by_sha in runs.items()}


def check_run(setting: Setting, fit_config: Path) -> None:
    """Refuse when the run's own config (``fit_config.yaml``, when it exists) trained on other prompts, reward,
    sampling or signals than ``setting``, the one compare_methods.py builds for the run's method now (source classes
    compared by name: some moved between modules since)."""
    if not fit_config.is_file():
        return
    ran = asdict(setting_of_config(setting.label, yaml.safe_load(fit_config.read_text())))
    built = asdict(setting)
    for fields in (ran, built):
        fields["source"]["class_path"] = fields["source"]["class_path"].rpartition(".")[2]
    differing = [name for name in built if built[name] != ran[name]]
    if differing:
        details = "; ".join(f"{name}: run {ran[name]!r}, built {built[name]!r}" for name in differing)
        raise ValueError(f"testbed {setting.label}: {fit_config} trained on another setting ({details})")
