"""The rollout DataModule: prompts in, scored groups of completions out.

The train dataloader is an ``IterableDataset`` that streams ``PromptBatch``es (B prompts, shuffled per
epoch from a seed, sharded by data-parallel rank). Generation does not happen in the dataloader:
Lightning pre-fetches one batch ahead, which would sample with weights one step stale. It happens in
``on_after_batch_transfer``, which Lightning calls right before the step that uses the batch; there the
engine generates G completions per prompt, the rewards score them, and the LightningModule adds what
needs its models (old and reference log-probs, embeddings) through ``score_rollout``: only the fields that
the loss or a callback reads (``lit_gcpo.data.batch.requested_fields``). Callbacks then see the complete
``RolloutBatch`` in ``on_train_batch_start``.

The module is used through ``lit_gcpo.data.contracts.RolloutPolicy`` (checked in ``setup``), and nothing flows back:
everything training reads about a batch (how it was sampled, which completions are correct) is on the batch.
"""

from __future__ import annotations

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal

import lightning as L
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lit_gcpo.algorithms.label_free import LabelFreeReward
from lit_gcpo.data.batch import PromptBatch, requested_fields
from lit_gcpo.data.contracts import RolloutPolicy, check_implements
from lit_gcpo.data.dynamic_sampling import DynamicSampling
from lit_gcpo.data.evaluation_passes import EvaluationAccess, TestPasses
from lit_gcpo.data.label_free import apply_label_free, label_free_problem, reward_sets
from lit_gcpo.data.off_policy import refuse_hf_options
from lit_gcpo.data.off_policy_vllm import refuse_vllm_options
from lit_gcpo.data.preparation import complete_rows, fit_to_context
from lit_gcpo.data.rollout import RolloutCollector, timed_answer_clusters
from lit_gcpo.data.sources import PromptSource
from lit_gcpo.data.streams import EvalPrompts, PromptStream
from lit_gcpo.data.templates import PromptRenderer, context_length
from lit_gcpo.data.training_rollouts import TrainingRollouts
from lit_gcpo.engines import build_engine
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.options import EngineOptions
from lit_gcpo.rewards.reward_model import RewardModel, load_reward_models, reward_name, reward_setting
from lit_gcpo.running.resume import convert_data_position
from lit_gcpo.training.parallel import is_sharded

log = logging.getLogger(__name__)


def run_seed(seed: int | None) -> int:
    """``seed``, else the one ``seed_everything`` set (Lightning's ``PL_GLOBAL_SEED``), else 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _stage(trainer: L.Trainer) -> str:
    """The stage of the batch being built: ``train``, ``val`` (also the sanity check), ``test`` or ``predict``."""
    if trainer.training:
        return "train"
    if trainer.testing:
        return "test"
    return "predict" if trainer.predicting else "val"


def _identity(batch: list[PromptBatch]) -> PromptBatch:
    return batch[0]


class RolloutDataModule(EvaluationAccess, L.LightningDataModule):
    """Streams groups of completions for GRPO-family training, and evaluation prompts.

    Args:
        train: where training prompts come from.
        val: validation prompts (None: no validation).
        test: prompts for ``lit-gcpo test``: one source or several (e.g. one per benchmark, each its own
            dataloader, reported separately); None: the validation prompts. A source with a ``template``
            or ``required_fields`` attribute (not None) uses them instead of the ones here.
        predict: prompts for ``lit-gcpo predict`` (sampled like evaluation; gold answers optional).
        template: the user message, with ``{field}`` placeholders filled from the row, or a named template
            (``qwen-math``: the Qwen2.5-Math "put your final answer within \\boxed{}" prompt).
        system: system message for chat templates.
        chat: use the tokenizer's chat template: ``auto`` (when it has one), ``always``, ``never``.
        required_fields: fields every row must have (besides the template's); rows missing one are skipped
            with a counted warning, and a field missing from every row is an error at setup.
        long_prompts: a prompt longer than the model's context minus ``sampling.max_new_tokens``: ``truncate``
            (keep its last tokens), ``skip``, both counted and logged with the rows, or ``error`` at setup. A
            truncated row carries ``over_context: True``; skipped rows are kept in ``dropped_long_rows``, so
            that the evaluation report counts both.
        batch_size: prompts per training step (B), per data-parallel rank.
        group_size: completions per prompt (G).
        rewards: reward functions by built-in name or dotted path (``pkg.module:function``), and learned reward models
            (``lit_gcpo.rewards.RewardModel``, by ``class_path``: loaded in ``setup`` on the trainer's device).
        reward_weights: weight of each reward in the total (default 1 each).
        reward_timeout: seconds one reward function may take for one batch before its scores count as failed.
        accuracy_reward: the reward whose value (1 = correct) is reported as accuracy.
        label_free: train without gold answers (``lit_gcpo.data.label_free``): ``TTRL``, ``EMPO``, ``SelfCertainty``
            or ``RENT`` (``--data.label_free.help EMPO``: its options); ``rewards`` are then extra rewards that may not
            read a gold, and validation and test grade with ``accuracy_reward``. None: the rewards read the golds.
        engine: the rollout engine, ``hf`` or ``vllm``.
        engine_options: options of the engine (``lit_gcpo.engines.options.EngineOptions``; a dict of them is
            accepted from Python), e.g. ``gpu_memory_utilization`` for vllm; unset: the engine's defaults.
        sampling: how training completions are sampled.
        val_samples: completions per evaluation prompt (1 with ``val_temperature`` 0 is greedy accuracy).
        val_temperature: sampling temperature for evaluation.
        val_batch_size: prompts per evaluation batch.
        seed: seeds the prompt order and the sampler (each prompt from its position in the stream: the same
            completions whatever the batch size and the number of ranks); None (the default): the run's
            ``seed_everything``.
        dynamic_sampling: drop groups without reward spread and draw more batches of the stream until the batch
            is full (DAPO; ``lit_gcpo.data.dynamic_sampling``). None (the default): off.
        off_policy: one-step-off-policy rollouts: batch t+1 is sampled, by a copy of the policy in a worker thread,
            while batch t trains, with weights one optimizer step old; the loss corrects with the module's
            ``rollout_correction`` (``lit_gcpo.data.off_policy``). False (the default): sampled at each step with the
            current weights. On several ranks (DDP, FSDP2) each samples its share, also with ``dynamic_sampling``;
            with ``vllm``, the DataModule's engine samples in the worker (``lit_gcpo.data.off_policy_vllm``; one
            process, ``sync_every`` 1, no sleep mode, not with ``dynamic_sampling``); with ``hf``, on the trainer's
            torch threads (``engine_options.decode_threads`` is refused).
    """

    def __init__(
        self,
        train: PromptSource | None = None,
        val: PromptSource | None = None,
        test: PromptSource | list[PromptSource] | None = None,
        predict: PromptSource | None = None,
        template: str = "{prompt}",
        system: str | None = None,
        chat: Literal["auto", "always", "never"] = "auto",
        required_fields: list[str] | None = None,
        long_prompts: Literal["truncate", "skip", "error"] = "truncate",
        batch_size: PositiveInt = 8,
        group_size: int = 8,
        rewards: list[str | RewardModel] | None = None,
        reward_weights: list[float] | None = None,
        reward_timeout: PositiveFloat = 10.0,
        accuracy_reward: str | None = "math_accuracy",
        label_free: LabelFreeReward | None = None,
        engine: Literal["hf", "vllm"] = "hf",
        engine_options: EngineOptions | None = None,
        sampling: SamplingConfig | None = None,
        val_samples: PositiveInt = 1,
        val_temperature: float = 0.0,
        val_batch_size: PositiveInt = 64,
        seed: int | None = None,
        dynamic_sampling: DynamicSampling | None = None,
        off_policy: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (group advantages need a group), got {group_size}")
        if val_samples < 1:
            raise ValueError(f"val_samples must be >= 1, got {val_samples}")
        rewards = list(rewards or ([] if label_free is not None else ["math_accuracy"]))  # label-free: extras only
        if reward_weights is not None and len(reward_weights) != len(rewards):
            raise ValueError(f"reward_weights has {len(reward_weights)} entries for {len(rewards)} rewards")
        names = [reward_name(spec) for spec in rewards]
        if accuracy_reward is not None and accuracy_reward not in names and label_free is None:
            raise ValueError(f"accuracy_reward {accuracy_reward!r} is not one of rewards {names}")
        self.dynamic_sampling = DynamicSampling.checked(dynamic_sampling, names)
        if off_policy and engine == "vllm" and dynamic_sampling is not None:
            raise ValueError("data.off_policy with data.engine vllm works without data.dynamic_sampling (for now)")
        self.off_policy, self._training = off_policy, None  # TrainingRollouts from the setup of a fit on
        self._train_stream: PromptStream | None = None  # the rounds of dynamic sampling read it
        problem = label_free_problem(label_free, rewards, accuracy_reward, dynamic_sampling is not None)
        if problem is not None:
            raise ValueError(problem)
        self.label_free = label_free
        self.train_source, self.val_source = train, val
        self.test_sources: list[PromptSource] = [test] if isinstance(test, PromptSource) else list(test or [])
        self.predict_source = predict
        self.template, self.system, self.chat = template, system, chat
        self.required_fields = list(required_fields) if required_fields is not None else ["answer"]
        self.long_prompts, self._context = long_prompts, None
        self.long_prompt_rows: dict[str, int] = {}
        self.dropped_long_rows: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # by split: (row, row) too long
        self.batch_size, self.group_size = batch_size, group_size
        self.reward_names, self.reward_weights, self.reward_timeout = rewards, reward_weights, reward_timeout
        self.accuracy_reward = accuracy_reward
        if isinstance(engine_options, dict):
            engine_options = EngineOptions(**engine_options)
        self.engine_name, self.engine_options = engine, engine_options or EngineOptions()
        self.engine_options.for_engine(engine)  # another engine's option is an error now, not at setup
        if off_policy and engine == "vllm":
            refuse_vllm_options(self.engine_options)
        elif off_policy:
            refuse_hf_options(self.engine_options)
        self.sampling = sampling or SamplingConfig()
        self.val_samples, self.val_temperature, self.val_batch_size = val_samples, val_temperature, val_batch_size
        self.seed = seed
        self._executor: ThreadPoolExecutor | None = None  # answer clustering; from setup to teardown
        self.consumed_batches = 0  # training prompt batches turned into rollouts (resume position)
        self.skipped_rows: dict[str, int] = {}
        self.collector: RolloutCollector | None = None
        self.train_rewards: Any = None  # the reward set of training batches, from setup on
        self._datasets: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
        self._test_passes = TestPasses()  # what each test dataloader is, from test_dataloader on
        self._synced_step: int | None = None
        self._policy: RolloutPolicy | None = None  # the LightningModule's services, from setup on

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        self._synced_step = None  # the first batch of every stage syncs the engine
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="answer-clusters")
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise RuntimeError("RolloutDataModule needs a Trainer with a LightningModule (a RolloutPolicy)")
        check_implements(module, RolloutPolicy, "the LightningModule of a RolloutDataModule,")
        self._policy = module
        tokenizer = module.tokenizer
        self.seed = run_seed(self.seed)
        self._context = context_length(module.policy)
        sources: dict[str, PromptSource | None] = {
            "train": self.train_source,
            "val": self.val_source,
            "predict": self.predict_source,
        }
        for index, source in enumerate(self.test_sources or [self.val_source]):
            sources[f"test{index}"] = source
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": [k for k in sources if k.startswith("test")],
            "predict": ["predict"],
        }
        for split in wanted.get(stage, []):
            source = sources[split]
            if source is not None and split not in self._datasets:
                source.bind_tokenizer(tokenizer)  # sources that budget their text in tokens
                self._datasets[split] = self._prepare(split, source, self._renderer(source, tokenizer))
        if self.collector is None:
            self.train_rewards, rewards = reward_sets(
                self.reward_names, self.reward_weights, self.reward_timeout, self.label_free, self.accuracy_reward
            )
            options = self.engine_options.for_engine(self.engine_name)
            engine = build_engine(self.engine_name, module.policy, tokenizer, **options)
            use_chat = self._renderer(None, tokenizer).use_chat
            load_reward_models(self.reward_names, self.trainer.strategy.root_device, prompts_use_chat=use_chat)
            self.collector = RolloutCollector(
                engine, tokenizer, rewards, add_special_tokens=not use_chat, accuracy_reward=self.accuracy_reward,
                policy_precision=module.precision_context,  # the hf engine samples in it (see RolloutCollector)
            )  # fmt: skip
        if self._training is None and stage == "fit":
            self._training = TrainingRollouts(self, module)

    def _renderer(self, source: PromptSource | None, tokenizer: Any) -> PromptRenderer:
        template = (source.template if source is not None else None) or self.template
        return PromptRenderer(tokenizer, template, self.system, self.chat)

    def _prepare(
        self, split: str, source: PromptSource, renderer: PromptRenderer
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows and prompts of ``split`` (``lit_gcpo.data.preparation``), with their counts recorded."""
        label_free = split == "train" and self.label_free is not None  # label-free training needs no gold
        selected = complete_rows(split, source, renderer, self.required_fields, needs_gold=not label_free)
        self.skipped_rows[split] = len(selected.skipped)
        if not selected.rows:
            raise ValueError(f"{split}: every row of {source.describe()} lacks a required field")
        if self._context is None:
            return selected.rows, selected.prompts
        # never a silent overflow of the model's context
        budget, label = self._context - self.sampling.max_new_tokens, f"{split}: {source.describe()}"
        rows, prompts, self.dropped_long_rows[split], self.long_prompt_rows[split] = fit_to_context(
            selected, renderer, budget, self.long_prompts, label
        )
        return rows, prompts

    # ------------------------------------------------------------------------------------ dataloaders
    def _shard(self, dataset: PromptStream | EvalPrompts) -> DataLoader:
        if self.trainer is not None:
            dataset.rank, dataset.world_size = self.trainer.global_rank, self.trainer.world_size
        if isinstance(dataset, EvalPrompts):
            dataset.lockstep = self.trainer is not None and is_sharded(self.trainer.strategy)
            dataset.batches()  # an impossible even split is an error now, not a hang at the first validation
        return DataLoader(dataset, batch_size=1, collate_fn=_identity, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        rows, prompts = self._datasets["train"]
        self._train_stream = PromptStream(rows, prompts, self.batch_size, self.seed, lambda: self.consumed_batches)
        return self._shard(self._train_stream)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self._datasets:
            return []
        rows, prompts = self._datasets["val"]
        return self._shard(EvalPrompts(rows, prompts, self.val_batch_size))

    def test_dataloader(self) -> list[DataLoader]:
        """One dataloader per test source and evaluation pass (``dataloader_idx`` = position), in the order
        given: a source with ``eval_variants`` (``BenchmarkSource``) may ask for several passes (greedy and
        sampled) and its own sampling settings; rows are tagged with ``variant`` and ``position``."""
        splits = sorted((k for k in self._datasets if k.startswith("test")), key=lambda k: int(k[4:]))
        sources = self.test_sources or [self.val_source]
        default_sampling = replace(self.sampling, temperature=self.val_temperature)
        splits_data = [(sources[int(split[4:])], *self._datasets[split]) for split in splits]
        datasets = self._test_passes.build(splits_data, default_sampling, self.val_samples, self.val_batch_size)
        return [self._shard(dataset) for dataset in datasets]

    def predict_dataloader(self) -> DataLoader:
        if "predict" not in self._datasets:
            raise ValueError("lit-gcpo predict needs prompts: set data.predict (e.g. a LocalFiles source)")
        return self._shard(EvalPrompts(*self._datasets["predict"], self.val_batch_size))

    # --------------------------------------------------------------------------------------- rollout
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, PromptBatch):
            return batch
        assert self.collector is not None and self._policy is not None, "setup() was not called"
        policy = self._policy
        training = self.trainer.training
        if self._training is not None and not training:
            self._training.wait()  # an off-policy worker's sampling is done before evaluation samples
        if not (training and self.off_policy):  # off-policy training syncs its engine at the step boundary itself
            self._sync_engine(policy)  # also before evaluation: a restored checkpoint, the current weights
        fields = requested_fields(self.trainer.callbacks, _stage(self.trainer))
        fields |= set(self.label_free.needs) if training and self.label_free is not None else set()
        # the engine gathers the policy's embeddings while sampling when it can (then no scoring pass is needed)
        embed = "embeddings" in fields
        if training:
            stream, position = self._train_stream.batch, self.consumed_batches
            rollout, drawn = self._training.draw(position, batch, stream, policy, embed)
            self.consumed_batches += drawn
        else:
            sampling, samples = self.eval_settings(dataloader_idx)
            seeds = self.prompt_seeds(self._eval_stream(dataloader_idx), batch)
            rollout = self.collector.collect(
                batch, samples, replace(sampling, seed=None), policy.device, seeds=seeds, with_embeddings=embed
            )
        # Answer clustering (math-verify, in its grading process) overlaps the policy's scoring pass. The worker
        # reads only what no one writes meanwhile (answers, group ids) and returns its result: the batch, its
        # metrics included, is written by this thread alone.
        assert self._executor is not None, "setup() was not called"
        clusters = None
        if "answer_clusters" in fields:
            clusters = self._executor.submit(timed_answer_clusters, rollout.answers, rollout.group_ids)
        policy.score_rollout(rollout, with_reference=training, fields=fields)
        if clusters is not None:
            rollout.answer_clusters, metrics = clusters.result()
            rollout.metrics.update(metrics)
        if training and self.label_free is not None:
            apply_label_free(rollout, self.label_free)
        return rollout

    def teardown(self, stage: str) -> None:
        """Stop the answer-clustering thread and the off-policy worker (a later ``setup`` starts new ones)."""
        if self._training is not None:
            self._training.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _sync_engine(self, policy: RolloutPolicy) -> None:
        """Push the policy's weights to the engine whenever they may have changed since the last push: after an
        optimizer step, and at the first batch of every fit, validation or test (a restored checkpoint). A
        no-op for ``hf``, which samples from the policy itself."""
        step = self.trainer.global_step
        if step != self._synced_step:
            self.collector.engine.sync_weights(policy.export_weights())
            self._synced_step = step

    def prompt_seeds(self, stream: str, batch: PromptBatch) -> list[int]:
        """One sampler seed per prompt, from ``seed``, the stream and the prompt's position in it: the same
        whatever the batch size or the number of ranks, distinct for every prompt."""
        positions = batch.positions if batch.positions is not None else batch.indices
        return [zlib.crc32(f"{self.seed}/{stream}/{position}".encode()) for position in positions]

    # ---------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        engine = self.collector.engine.state_dict() if self.collector is not None else {}
        world_size = self.trainer.world_size if self.trainer is not None else 1
        # the position is in batches: their size and the ranks let a run with other ones convert it
        # (plain types: weights-only loading refuses jsonargparse's PositiveInt)
        settings = {"batch_size": int(self.batch_size), "world_size": world_size, "group_size": int(self.group_size)}
        weights = None if self.reward_weights is None else [float(weight) for weight in self.reward_weights]
        rewards = {"rewards": [reward_setting(spec) for spec in self.reward_names], "reward_weights": weights}
        rewards["dynamic_sampling"] = None if self.dynamic_sampling is None else self.dynamic_sampling.plain()
        rewards["off_policy"] = bool(self.off_policy)  # and every rank's in-flight batch (a collective), saved:
        rewards["off_policy_in_flight"] = [] if self._training is None else self._training.state_dict()
        return {"consumed_batches": self.consumed_batches, "seed": self.seed, "engine": engine, **settings, **rewards}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "consumed_batches" not in state_dict:
            raise KeyError("RolloutDataModule state lacks 'consumed_batches': not a lit-gcpo checkpoint?")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        self.consumed_batches, change = convert_data_position(state_dict, self.batch_size, world_size)
        if change:
            rank_zero_warn(change)
        if self.collector is not None:  # built in setup, which Lightning runs before restoring
            self.collector.engine.load_state_dict(state_dict.get("engine", {}))
        if self._training is not None:
            self._training.load_state_dict(state_dict.get("off_policy_in_flight", []))
