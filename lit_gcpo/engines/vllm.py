"""The ``vllm`` rollout engine: vLLM colocated in the trainer's process, weights pushed from memory.

The engine runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the trainer's tensors reach
the model runner without serialisation: ``sync_weights`` hands the ``(hf_name, tensor)`` pairs to the
worker's ``reload_weights`` (the shared path that also works on the CPU, where vLLM repacks linear
weights into oneDNN kernels and the model's own ``load_weights`` cannot be called) and then empties the
prefix cache, whose KV blocks were computed with the old weights. On the CPU, a model with tied
embeddings also needs its output head repacked after the reload (vLLM 0.32 keeps the head's old packed
copy: log-probs lagged the policy by 0.07 after one step); ``vllm_checkpoint.repack_tied_lm_head`` does that.

Environment (defaults set with ``os.environ.setdefault`` when this module is imported):

- ``OMP_WAIT_POLICY=PASSIVE`` MUST be set before torch is imported, so the entry point has to set it
  (``lit_gcpo/running/cli.py`` does): with vLLM and the trainer in one process, OpenMP busy-waiting between
  their two thread pools made generation 7x and a train step 14x slower on a 2-core CPU. Setting it
  here only helps a process that imports this module before torch.
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (forced, not a default): in-process engine, which also avoids
  the ``__main__`` re-import of spawned workers, so the engine can be built under pytest.
- ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB): otherwise vLLM sizes the KV cache from NUMA node 0 and may
  refuse to start. ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``: otherwise one of two cores stays idle.
- ``HF_HUB_OFFLINE=1``: vLLM must never reach for the hub; the model is a local directory.
These are read when vLLM creates the engine, so setting them at import time of this module is enough.

Project choices the vLLM docs leave open:

- Log-probs: ``logprobs_mode="processed_logprobs"``, the log-probability of the sampled token under
  the distribution vLLM sampled from. With ``top_p=1`` and ``top_k=-1`` that is
  ``log_softmax(logits / T)``, what the trainer and ``HFEngine`` compute; with top-p/top-k it is the
  truncated, renormalised distribution (the true behaviour policy), which ``HFEngine`` does not report.
  Greedy decoding (``T=0``) reports ``log_softmax(logits)``. ``SamplingConfig.min_tokens`` is vLLM's own
  ``min_tokens``: its processor sets the stop ids' logits (our end-of-sequence ids) to -inf before the log-probs
  are taken, so the tokens it constrains carry the suppressed distribution's log-probs, as ``HFEngine``'s do;
  against the trainer's ``log p`` they differ by ``-log(1 - p_eos)``, which the rollout correction weighs.
- Seeds: each prompt gets its own request seed (the caller's per-prompt ``seeds``, else one derived from
  ``(SamplingConfig.seed, i)`` by :func:`lit_gcpo.engines.base.prompt_seeds`), so groups do not share noise
  and a prompt's completions do not depend on the batch it is in.
- End of sequence: every id of :func:`lit_gcpo.engines.base.end_of_sequence_ids` is a stop token id (vLLM
  reads the checkpoint's generation config itself only with ``generation_config="auto"``, which would also
  bring the checkpoint's sampling defaults). Without a seed the engine samples from its
  own torch RNG stream (seeded with ``seed`` at creation), kept apart from the trainer's.
- RNG isolation: vLLM reseeds the process-global RNGs when it starts and samples from the global torch
  generator. The torch (CPU and CUDA), numpy and ``random`` states of the trainer are saved before and
  restored after engine creation, ``generate`` and ``sync_weights``, so resuming a run stays exact.
- LoRA: vLLM receives plain merged weights with Hugging Face names; ``policy`` may be a peft model, whose
  adapters are merged on the fly by :func:`lit_gcpo.training.policy.merged_state_items` (the trained model is not
  modified). The caller of ``sync_weights`` passes merged weights the same way (``export_weights``).
- Several data-parallel ranks (DDP, FSDP2): one colocated engine per rank, each generating its own prompt
  shard on its own device, with vLLM's ``external_launcher`` executor (what TRL's colocate mode uses). It
  joins the trainer's process group instead of creating one (``RANK``/``LOCAL_RANK`` come from it) and
  builds size-1 tensor-parallel groups inside it, so the engines never talk to each other after start-up
  (they agree on the KV-cache size once, a collective: every rank builds its engine at the same point).
  Each rank syncs its own engine from the full weights (FSDP shards are gathered first). Tested on the CPU
  with 2 gloo ranks (tests/vllm_engine/test_vllm_ddp.py). Tensor parallelism and sleep mode stay GPU-only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lit_gcpo.engines.base import Generation, RolloutEngine, SamplingConfig, end_of_sequence_ids, prompt_seeds
from lit_gcpo.engines.vllm_checkpoint import (
    WeightSyncError,
    checkpoint_spec,
    policy_state_names,
    repack_tied_lm_head,
    validated_weights,
    write_policy,
)
from lit_gcpo.engines.vllm_guards import ExclusiveCalls, claim_process, exclusive, preserved_global_rng, release_process


def _check_options(sync_every: int, tensor_parallel_size: int, enable_sleep_mode: bool) -> None:
    """Refuse options the colocated engine cannot honour, and a missing vLLM, before anything is written."""
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    if tensor_parallel_size != 1:
        raise ValueError(
            f"tensor_parallel_size must be 1 for the colocated in-process engine, got {tensor_parallel_size}"
        )
    if enable_sleep_mode and not torch.cuda.is_available():
        raise ValueError("enable_sleep_mode needs a CUDA GPU (vLLM's sleep mode frees GPU memory)")
    try:
        from vllm import LLM  # noqa: F401 (imported again where the engine starts)
    except ImportError as err:
        raise ImportError(
            "VLLMEngine needs vllm: on a GPU pip install 'lit-gcpo[vllm]', on a CPU use the venv of "
            f"scripts/setup_vllm_cpu.sh ({err})"
        ) from err


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _data_parallel_executor() -> str | None:
    """``external_launcher`` inside a trainer's process group of several ranks (one engine per rank, joining that
    group), else None (vLLM's in-process default)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    # the executor reads the rank from the environment that torchrun would set; Lightning's launcher may not
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % _local_world()))
    return "external_launcher"


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))


def _generation(outputs: list[Any], per_request: int, num_samples: int) -> Generation:
    """The ``Generation`` of vLLM's request ``outputs`` (``per_request`` samples each, repeated to ``num_samples``)."""
    completion_ids: list[list[int]] = []
    logprobs: list[list[float]] = []
    truncated: list[bool] = []
    for row, output in enumerate(outputs):
        samples = sorted(output.outputs, key=lambda sample: sample.index)
        if len(samples) != per_request:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {row}, expected {per_request}")
        for sample in samples * (num_samples // per_request):
            ids = list(sample.token_ids)
            completion_ids.append(ids)
            # logprobs=0 returns one entry per position holding the sampled token's log-prob.
            logprobs.append([position[token].logprob for token, position in zip(ids, sample.logprobs, strict=True)])
            truncated.append(sample.finish_reason == "length")
    return Generation(completion_ids=completion_ids, logprobs=logprobs, truncated=truncated)


class VLLMEngine(RolloutEngine):
    """Rollouts with vLLM in the trainer's process; the policy's weights are synced from memory.

    Args:
        policy: the trained transformers causal LM (or a peft model wrapping one). It is read once, to
            write the initial checkpoint when ``model_path`` is None and to learn which parameter names
            the trainer will send (tied weights that the checkpoint omits are dropped on sync).
        tokenizer: its tokenizer; saved beside the initial checkpoint when ``model_path`` is None.
        model_path: a local Hugging Face directory (safetensors) with the policy's architecture and
            tokenizer for vLLM to start from; None writes the current policy to a temporary directory.
        dtype: vLLM's compute dtype (``float32``, ``bfloat16``, ``float16``; ``auto`` lets vLLM choose,
            which may be half precision for a float32 checkpoint); synced float tensors are cast to it.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); GPU only.
        tensor_parallel_size: vLLM's tensor parallelism; only 1 works with the in-process engine.
        enable_sleep_mode: let :meth:`sleep` free the GPU weights and KV cache during training (GPU only).
        max_model_len: longest prompt + completion in tokens; None = the model's context length.
        enforce_eager: skip torch.compile / CUDA graphs (shorter start-up, slower generation).
        seed: seed of vLLM's start-up and of the engine's own sampling RNG stream.
        sync_every: load the weights on every k-th ``sync_weights`` call only (1 = every call). The
            skipped calls leave the engine up to k-1 optimizer steps behind the policy, which the
            importance ratio against the trainer's log-probs must then absorb; the skipped calls do not
            read the weights at all. ``sync_weights(..., force=True)`` always loads.
        enable_prefix_caching: reuse the KV of shared prompt prefixes (the G samples of a prompt share
            it); reset after every sync.

    One engine per process and one call at a time (``generate``, ``sync_weights``, ``sleep``, ``wake_up``,
    ``close``), from any thread: a second engine while this one is open, or a call overlapping another's, raises
    ``RuntimeError`` (see :mod:`lit_gcpo.engines.vllm_guards`). :meth:`close` frees the process for a new engine.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        model_path: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        sync_every: int = 1,
        enable_prefix_caching: bool = True,
    ) -> None:
        _check_options(sync_every, tensor_parallel_size, enable_sleep_mode)
        self.tokenizer = tokenizer
        self.eos_token_ids = end_of_sequence_ids(policy, tokenizer)
        self.sync_every = sync_every
        self.enable_sleep_mode = enable_sleep_mode
        self._sync_calls = 0
        self._asleep = False
        self._broken: str | None = None
        self._calls = ExclusiveCalls("VLLMEngine")
        self.llm: Any = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        claim_process(self)
        try:
            self.model_path = model_path if model_path is not None else self._write_checkpoint(policy, tokenizer)
            self._expected = checkpoint_spec(self.model_path)
            # Names the trainer sends but the checkpoint omits: tied aliases such as lm_head.weight.
            self._dropped_names = policy_state_names(policy) - set(self._expected)
            self._start(
                self.model_path,
                seed,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=enable_sleep_mode,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                enable_prefix_caching=enable_prefix_caching,
            )
        except BaseException:
            self._shutdown()
            raise
        model_config = self.llm.llm_engine.model_config
        self._repack_tied_head = _on_cpu() and bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))
        self.max_model_len = model_config.max_model_len
        self.dtype = model_config.dtype

    def _write_checkpoint(self, policy: torch.nn.Module, tokenizer: Any) -> str:
        """The policy and tokenizer saved to a temporary directory (removed by :meth:`close`); its path."""
        self._tmpdir = tempfile.TemporaryDirectory(prefix="lit_gcpo_vllm_")
        write_policy(policy, tokenizer, self._tmpdir.name)
        return self._tmpdir.name

    def _start(self, model_path: str, seed: int, **options: Any) -> None:
        """Create the vLLM engine from ``model_path`` (``options``: this class's arguments of those names) with
        the trainer's RNG states preserved, and seed the engine's own sampling stream."""
        from vllm import LLM

        executor = _data_parallel_executor()
        with preserved_global_rng():
            self.llm = LLM(
                model=model_path,
                tokenizer=model_path,
                seed=seed,
                distributed_executor_backend=executor,
                logprobs_mode="processed_logprobs",
                generation_config="vllm",  # ignore the checkpoint's sampling defaults
                **options,
            )
            torch.manual_seed(seed)
            self._engine_rng = torch.random.get_rng_state()
            self._engine_cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    # ------------------------------------------------------------------ generation

    @exclusive
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
        keep_global_rng: bool = True,
    ) -> Generation:
        """``num_samples`` completions per prompt, group-major, with the sampled tokens' log-probs.

        ``keep_global_rng`` False is for a caller in a thread other than the trainer's (the one-step-off-policy
        worker, ``lit_gcpo.data.off_policy_vllm``): the global RNG states are neither saved nor restored (a restore
        there would rewind the trainer's own draws made meanwhile) and every prompt needs a seed. vLLM's CPU
        sampler still draws one number per row and decoding step from the global torch generator and, for a
        seeded request, replaces it by one from the request's own: the tokens do not depend on it.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_usable()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not keep_global_rng and seeds is None:
            raise ValueError("generate(keep_global_rng=False) needs a seed for every prompt")
        for row, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt_ids[{row}] is empty")
            if len(ids) + 1 > self.max_model_len:
                raise ValueError(
                    f"prompt_ids[{row}] has {len(ids)} tokens; max_model_len {self.max_model_len} leaves "
                    f"no room for a completion"
                )
        self._wake_up()
        # vLLM refuses n > 1 for greedy decoding: decode once and repeat the (deterministic) completion.
        per_request = 1 if sampling.temperature == 0 else num_samples
        per_prompt = prompt_seeds(sampling, len(prompt_ids), seeds)
        params = [self._sampling_params(SamplingParams, sampling, per_request, seed) for seed in per_prompt]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        with self._engine_rng_stream() if keep_global_rng else contextlib.nullcontext():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return _generation(outputs, per_request, num_samples)

    def _sampling_params(self, factory: Any, sampling: SamplingConfig, num_samples: int, seed: int | None) -> Any:
        return factory(
            n=num_samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0 if sampling.top_k == -1 else sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=self.eos_token_ids,
            include_stop_str_in_output=True,
            seed=seed,
            logprobs=0,
        )

    @contextlib.contextmanager
    def _engine_rng_stream(self) -> Iterator[None]:
        """Run with the engine's own torch RNG stream; the trainer's global RNG states come back after."""
        with preserved_global_rng():
            torch.random.set_rng_state(self._engine_rng)
            if self._engine_cuda_rng is not None:
                torch.cuda.set_rng_state_all(self._engine_cuda_rng)
            yield
            self._engine_rng = torch.random.get_rng_state()
            if self._engine_cuda_rng is not None:
                self._engine_cuda_rng = torch.cuda.get_rng_state_all()

    # ------------------------------------------------------------------ weights

    @exclusive
    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]], force: bool = False) -> None:
        """Load the policy's weights (Hugging Face names, LoRA merged) on every ``sync_every``-th call.

        All names, shapes and dtypes are checked against the checkpoint the engine started from before
        anything is loaded: a reload that failed half-way would leave layers on the meta device. Raises
        :class:`WeightSyncError` naming the offending parameter; the engine keeps its previous weights
        then. A failure inside vLLM's reload marks the engine unusable (its weights are undefined).
        """
        self._check_usable()
        self._sync_calls += 1
        if not force and self._sync_calls % self.sync_every != 0:
            return
        pairs = validated_weights(named_parameters, self._expected, self._dropped_names, self.model_path)
        self._wake_up()
        with preserved_global_rng():
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._cast(pairs)})
            except Exception as err:
                self._broken = f"reload_weights failed: {err!r}"
                raise WeightSyncError(
                    f"vLLM's reload_weights failed ({err!r}); the engine's weights are undefined, recreate it"
                ) from err
            if self._repack_tied_head:
                self.llm.collective_rpc(repack_tied_lm_head)
        if not self.llm.reset_prefix_cache():
            self._broken = "the prefix cache could not be reset after a sync"
            raise WeightSyncError("vLLM refused to reset its prefix cache after a sync; stale KV would be reused")

    def state_dict(self) -> dict[str, int]:
        """The phase of ``sync_every``: how many sync calls were made (a resumed run loads on the same calls)."""
        return {"sync_calls": self._sync_calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._sync_calls = int(state.get("sync_calls", 0))

    def _cast(self, pairs: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in pairs:
            tensor = tensor.detach()
            yield name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    # ------------------------------------------------------------------ lifecycle

    @exclusive
    def sleep(self) -> None:
        """Free the engine's GPU weights and KV cache while the trainer runs (no-op without sleep mode)."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    @exclusive
    def wake_up(self) -> None:
        """Bring the engine back after :meth:`sleep` (``generate`` and ``sync_weights`` do it themselves)."""
        self._wake_up()

    def _wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    @exclusive
    def close(self) -> None:
        """Shut the vLLM engine down now, with the process-wide parallel state it set up (another engine may start
        after this), and drop the temporary checkpoint directory. Several ranks: vLLM's teardown also destroys
        the default ``torch.distributed`` group, the trainer's, so close only when the trainer is done with it."""
        self._broken = "the engine was closed"
        self._shutdown()

    def _shutdown(self) -> None:
        """Stop vLLM now (a shutdown left to the garbage collector would come late and tear down the parallel state
        of an engine started meanwhile), free the process for another engine and drop the checkpoint copy."""
        try:
            if self.llm is not None:
                self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
            release_process(self)  # with what a start that failed half-way left of vLLM's parallel state
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
                self._tmpdir = None

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"VLLMEngine cannot be used: {self._broken}")
