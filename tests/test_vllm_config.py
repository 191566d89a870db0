"""The plugin's config hook (compat.py, patch 2) on the resolved VllmConfig, and the frontend request validator
(hogwild_vllm.validation). Configs are built in this process with EngineArgs.create_engine_config (no engine)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402

import hogwild_vllm  # noqa: E402
from hogwild_vllm import compat, validation  # noqa: E402
from hogwild_vllm.scheduler import HogwildScheduler  # noqa: E402
from hogwild_vllm.testing.tiny_models import build_tiny_model  # noqa: E402

V2 = compat.V2_RUNNER_ENV


@pytest.fixture(scope="module")
def tiny() -> str:
    hogwild_vllm.register()
    return str(build_tiny_model("qwen2"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hook sets VLLM_USE_V2_MODEL_RUNNER in os.environ; monkeypatch restores it after each test.
    monkeypatch.delenv(V2, raising=False)


def make_config(model: str, on: bool = True, **kwargs: Any) -> Any:
    extra = {"additional_config": {"hogwild": {}}} if on else {}
    args = EngineArgs(model=model, dtype="float32", max_model_len=512, block_size=32, **extra, **kwargs)
    return args.create_engine_config()


# --- config hook ------------------------------------------------------------------------------------------------


def test_plugin_on_resolves_sync_hogwild_scheduler_v1_runner(tiny):
    import os

    cfg = make_config(tiny)
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.scheduler_config.scheduler_cls == compat.SCHEDULER_PATH
    assert cfg.scheduler_config.get_scheduler_cls() is HogwildScheduler
    assert os.environ[V2] == "0"
    assert cfg.use_v2_model_runner is False


def test_plugin_off_leaves_config_untouched(tiny):
    import os

    cfg = make_config(tiny, on=False)
    assert cfg.scheduler_config.scheduler_cls is None
    assert V2 not in os.environ
    off_custom = make_config(tiny, on=False, scheduler_cls="vllm.v1.core.sched.async_scheduler.AsyncScheduler")
    assert off_custom.scheduler_config.scheduler_cls == "vllm.v1.core.sched.async_scheduler.AsyncScheduler"


def test_hook_is_idempotent():
    hogwild_vllm.register()
    hogwild_vllm.register()
    assert compat._CONFIG_PATCHED == [True]


class MyScheduler(HogwildScheduler):
    pass


def test_scheduler_subclass_kept_other_class_refused(tiny):
    cfg = make_config(tiny, scheduler_cls=MyScheduler)
    assert cfg.scheduler_config.get_scheduler_cls() is MyScheduler
    with pytest.raises(ValueError, match="scheduler_cls=.*AsyncScheduler.*not a subclass of .*HogwildScheduler"):
        make_config(tiny, scheduler_cls="vllm.v1.core.sched.async_scheduler.AsyncScheduler")


def test_v2_runner_refused_when_user_sets_it(tiny, monkeypatch):
    monkeypatch.setenv(V2, "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=1 is not supported"):
        make_config(tiny)
    monkeypatch.setenv(V2, "0")
    assert make_config(tiny).use_v2_model_runner is False


def test_bad_cpu_packing_refused_at_startup(tiny, monkeypatch):
    monkeypatch.setenv(compat.PACKING_ENV, "amx16")
    with pytest.raises(ValueError, match="HOGWILD_CPU_PACKING='amx16' is not supported"):
        make_config(tiny)
    monkeypatch.setenv(compat.PACKING_ENV, "vec")
    assert make_config(tiny).additional_config == {"hogwild": {}}


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
         "speculative_config"),
        ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "kv_transfer_config"),
    ],
    ids=["pipeline_parallel", "speculative", "kv_connector"],
)
def test_refusals_name_the_option(tiny, kwargs, names):
    with pytest.raises(ValueError, match=f"hogwild: .*{names}"):
        make_config(tiny, **kwargs)
    make_config(tiny, on=False, **{k: v for k, v in kwargs.items() if k != "pipeline_parallel_size"})


def test_refusals_on_fake_configs():
    """Features the tiny qwen2 cannot switch on (MLA) or that need more setup, checked on stand-in configs."""
    ok = SimpleNamespace(speculative_config=None, parallel_config=SimpleNamespace(pipeline_parallel_size=1),
                         kv_transfer_config=None, ec_transfer_config=None,
                         cache_config=SimpleNamespace(kv_sharing_fast_prefill=False),
                         model_config=SimpleNamespace(use_mla=False, skip_tokenizer_init=False))
    assert compat.refusals(ok) == []
    cases = [
        ("model_config", SimpleNamespace(use_mla=True, skip_tokenizer_init=False), "MLA"),
        ("model_config", SimpleNamespace(use_mla=False, skip_tokenizer_init=True), "skip_tokenizer_init"),
        ("cache_config", SimpleNamespace(kv_sharing_fast_prefill=True), "kv_sharing_fast_prefill"),
        ("ec_transfer_config", object(), "ec_transfer_config"),
    ]
    for attr, value, name in cases:
        found = compat.refusals(SimpleNamespace(**{**vars(ok), attr: value}))
        assert len(found) == 1 and name in found[0], found


def test_version_checked_when_on(tiny, monkeypatch):
    monkeypatch.setattr(compat, "SUPPORTED_VLLM", ("0.0.1",))
    with pytest.raises(compat.UnsupportedVllmError, match="supports vLLM 0.0.1"):
        make_config(tiny)
    make_config(tiny, on=False)


# --- request validator ------------------------------------------------------------------------------------------

GOOD = {"workers": 3, "layout": "interleaved", "max_tokens": 64}


def params(hogwild: Any = None, **kwargs: Any) -> SamplingParams:
    extra = {"hogwild": hogwild} if hogwild is not None else None
    return SamplingParams(max_tokens=8, extra_args=extra, **kwargs)


@pytest.fixture
def groups_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compat._FRONTEND, "on", True)


@pytest.mark.parametrize(
    ("hogwild", "kwargs", "message"),
    [
        ({"workers": 0}, {}, "'workers' must be an integer in 1..16"),
        ({"workerz": 2}, {}, "unknown hogwild option(s) ['workerz']"),
        ({"layout": "diagonal"}, {}, "'layout' must be one of"),
        ('{"workers": 2,', {}, "not valid JSON"),
        ("[1, 2]", {}, "hogwild options must be a mapping"),
        ({"templates": {"intro": "no name"}}, {}, "template 'intro' must contain '{name}'"),
        (GOOD, {"n": 2}, "n=2"),
        (GOOD, {"stop": ["\n\n"]}, "stop strings"),
        (json.dumps(GOOD), {"stop": "x"}, "stop strings"),
        (GOOD, {"logprobs": 2}, "logprobs"),
    ],
    ids=["workers0", "unknown_key", "bad_layout", "bad_json", "json_not_object", "bad_template", "n2", "stop",
         "stop_json", "logprobs"],
)
def test_validator_rejects_bad_options(groups_on, hogwild, kwargs, message):
    with pytest.raises(VLLMValidationError) as info:
        validation.HogwildRequestValidator.validate_params(params(hogwild, **kwargs))
    assert message in str(info.value) and str(info.value).startswith("hogwild: ")


def test_validator_accepts_good_dict_and_json_string(groups_on):
    for raw in (GOOD, json.dumps(GOOD), {}):
        validation.HogwildRequestValidator.validate_params(params(raw))
    group = validation.parse_request(params(json.dumps(GOOD)))
    assert group is not None and group.workers == 3 and group.layout.value == "interleaved"


def test_validator_passes_plain_requests():
    for p in (params(), SamplingParams(n=3, stop=["x"], logprobs=1), SamplingParams(extra_args={"other": 1})):
        validation.HogwildRequestValidator.validate_params(p)
        assert validation.parse_request(p) is None


def test_groups_refused_when_the_plugin_is_off(monkeypatch):
    monkeypatch.setitem(compat._FRONTEND, "on", False)
    with pytest.raises(VLLMValidationError, match="the hogwild plugin is not switched on for this engine"):
        validation.HogwildRequestValidator.validate_params(params(GOOD))
    # Bad options still get their own message first.
    with pytest.raises(VLLMValidationError, match="'workers'"):
        validation.HogwildRequestValidator.validate_params(params({"workers": 0}))


def test_engine_config_tells_the_frontend_whether_groups_run(tiny, monkeypatch):
    """The validator runs in the process that built the engine config: the config hook records on / off there."""
    monkeypatch.setitem(compat._FRONTEND, "on", False)
    make_config(tiny)
    assert compat.groups_enabled_here()
    validation.HogwildRequestValidator.validate_params(params(GOOD))
    make_config(tiny, on=False)
    assert not compat.groups_enabled_here()


def test_validator_leaves_logits_alone():
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

    proc = validation.HogwildRequestValidator(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    logits = torch.randn(3, 11)
    before = logits.clone()
    assert proc.apply(logits) is logits and torch.equal(logits, before)
    assert proc.is_argmax_invariant()
    proc.update_state(None)
    proc.update_state(BatchUpdate(batch_size=0, removed=[], added=[], moved=[]))
    assert isinstance(proc, LogitsProcessor)


def test_validator_is_an_installed_entry_point():
    from importlib.metadata import entry_points

    from vllm.v1.sample.logits_processor import LOGITSPROCS_GROUP

    eps = {ep.name: ep for ep in entry_points(group=LOGITSPROCS_GROUP)}
    assert eps["hogwild_validate"].load() is validation.HogwildRequestValidator
