"""Tests for hogwild_vllm.rope: delta rotation of queries against vLLM's and transformers' RoPE.

Core property: rotating a query already rotated at position p by delta d equals rotating the raw
query at p + d (negative d included), for every supported rope type and pairing style.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import torch

from hogwild_vllm.rope import (
    DeltaRope,
    RopeSpec,
    UnsupportedRopeError,
    _unit_cos_sin_table,
    delta_rope_for_model,
    rope_spec_from_hf_config,
)

transformers = pytest.importorskip("transformers")

# Max abs error allowed, per dtype, relative to inputs ~ N(0, 1). fp32: angle rounding of p * inv_freq
# at positions up to ~8k (ulp(8192) ~ 1e-3 rad) times |x| <= ~5. bf16: vLLM rotates in bf16 with bf16
# cos/sin, ~2^-8 relative per product, plus the final bf16 rounding of our output.
class Tolerance(NamedTuple):
    atol: float
    rtol: float


TOLERANCE: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=3e-3, rtol=1e-4),
    torch.bfloat16: Tolerance(atol=8e-2, rtol=2e-2),
}
NUM_TOKENS, NUM_HEADS = 64, 4

# name -> (head_size, rotary_dim, max_position, base, is_neox_style, type-specific rope parameters)
CASES: dict[str, tuple[int, int, int, float, bool, dict[str, Any]]] = {
    "default_neox": (64, 64, 4096, 10000.0, True, {"rope_type": "default"}),
    "default_gptj": (64, 64, 4096, 10000.0, False, {"rope_type": "default"}),
    "partial_neox": (80, 32, 4096, 10000.0, True, {"rope_type": "default"}),
    "partial_gptj": (96, 64, 2048, 10000.0, False, {"rope_type": "default"}),
    "linear": (64, 64, 1024, 10000.0, True, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (128, 128, 8192, 500000.0, True, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    "dynamic": (64, 64, 4096, 10000.0, True, {"rope_type": "dynamic", "factor": 4.0}),
    "dynamic_alpha": (64, 64, 4096, 10000.0, True, {"rope_type": "dynamic", "alpha": 2.0}),
    "yarn": (64, 64, 8192, 10000.0, True, {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 2048}),
    "yarn_partial_gptj": (96, 64, 4096, 1e6, False, {"rope_type": "yarn", "factor": 2.0,
                                                     "original_max_position_embeddings": 2048}),
}
PARTIAL_CASES = [name for name, case in CASES.items() if case[1] < case[0]]


@pytest.fixture(scope="module", autouse=True)
def vllm_context() -> Iterator[None]:
    """vLLM's rotary modules are CustomOps: constructing one reads the current vLLM config."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh random inputs, seeded per test (reproducible from the test id)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_spec(name: str) -> RopeSpec:
    head, rot, max_pos, base, neox, params = CASES[name]
    return RopeSpec(head, rot, max_pos, base, neox, dict(params))


def vllm_module(name: str, dtype: torch.dtype) -> Any:
    """The rotary module exactly as a vLLM model builds it (partial rotary given as a factor)."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    head, rot, max_pos, base, neox, params = CASES[name]
    rope_parameters = dict(params, rope_theta=base, partial_rotary_factor=rot / head)
    module = get_rope(head, max_pos, neox, rope_parameters, dtype=dtype)
    assert module.rotary_dim == rot
    return module


def random_positions(gen: torch.Generator, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p uniform in [0, limit), d such that p + d is uniform in [0, limit); both signs present."""
    p = torch.randint(0, limit, (NUM_TOKENS,), generator=gen)
    d = torch.randint(0, limit, (NUM_TOKENS,), generator=gen) - p
    d[0], d[1] = -p[0], limit - 1 - p[1]  # extremes: back to 0 and forward to the last position
    assert (d < 0).any() and (d > 0).any()
    return p, d


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol.atol, rtol=tol.rtol)


# ---------------------------------------------------------------- vLLM's RoPE as the reference


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_delta_matches_vllm(name: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    module = vllm_module(name, dtype)
    delta_rope = DeltaRope(make_spec(name))
    limit = module.cos_sin_cache.shape[0]
    assert delta_rope.max_delta == limit - 1
    p, d = random_positions(gen, limit)
    x = torch.randn(NUM_TOKENS, NUM_HEADS, module.head_size, generator=gen).to(dtype)
    at_p, _ = module.forward_native(p, x.clone())
    at_p_plus_d, _ = module.forward_native(p + d, x.clone())
    assert_close(delta_rope.rotate(at_p, d), at_p_plus_d, dtype)


def test_table_is_vllm_cache_without_mscale() -> None:
    for name in CASES:
        module = vllm_module(name, torch.float32)
        table = DeltaRope(make_spec(name)).cos_sin_table
        cos, sin = table.chunk(2, dim=-1)
        torch.testing.assert_close(cos.square() + sin.square(), torch.ones_like(cos), atol=1e-6, rtol=0)
        mscale = getattr(module, "mscale", 1.0)
        assert (mscale > 1.05) == name.startswith("yarn")  # the yarn cases really carry a scale
        torch.testing.assert_close(table * mscale, module.cos_sin_cache, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- transformers' RoPE as the reference


def hf_neox_rope(modeling: Any, rotary_cls: str, config: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x [T, H, D], positions [T]) -> x rotated by transformers' rotary class + apply_rotary_pos_emb."""
    rotary = getattr(modeling, rotary_cls)(config=config)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rot = int(head * config.rope_parameters.get("partial_rotary_factor", 1.0))

    def apply(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q = x.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        cos, sin = rotary(q, positions.unsqueeze(0))
        q_rot, _ = modeling.apply_rotary_pos_emb(q[..., :rot], q[..., :rot], cos, sin)
        return torch.cat((q_rot, q[..., rot:]), dim=-1)[0].transpose(0, 1)

    return apply


def hf_gptj_rope(config: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """GPT-J's interleaved partial RoPE, as GPTJAttention.forward applies it ([B, T, H, D] layout)."""
    from transformers.models.gptj import modeling_gptj as modeling

    rot = config.rotary_dim
    table = modeling.create_sinusoidal_positions(config.max_position_embeddings, rot)

    def apply(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        sin, cos = torch.split(table[positions].unsqueeze(0), rot // 2, dim=-1)
        q = x.unsqueeze(0)
        q_rot = modeling.apply_rotary_pos_emb(q[..., :rot], sin, cos)
        return torch.cat((q_rot, q[..., rot:]), dim=-1)[0]

    return apply


def hf_case(name: str) -> tuple[Any, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from transformers.models.llama import modeling_llama
    from transformers.models.phi import modeling_phi
    from transformers.models.qwen2 import modeling_qwen2

    small = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4)
    if name == "qwen2_default":
        config = transformers.Qwen2Config(**small, max_position_embeddings=4096,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return config, hf_neox_rope(modeling_qwen2, "Qwen2RotaryEmbedding", config)
    if name == "llama_llama3":
        config = transformers.LlamaConfig(**small, max_position_embeddings=8192, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
        return config, hf_neox_rope(modeling_llama, "LlamaRotaryEmbedding", config)
    if name == "llama_linear_legacy":
        config = transformers.LlamaConfig(**small, max_position_embeddings=2048, rope_theta=1e5,
                                          rope_scaling={"type": "linear", "factor": 2.0})
        return config, hf_neox_rope(modeling_llama, "LlamaRotaryEmbedding", config)
    if name == "llama_yarn":
        config = transformers.LlamaConfig(**small, max_position_embeddings=8192, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048})
        return config, hf_neox_rope(modeling_llama, "LlamaRotaryEmbedding", config)
    if name == "phi_partial":
        config = transformers.PhiConfig(hidden_size=320, num_attention_heads=4, max_position_embeddings=2048,
                                        partial_rotary_factor=0.4)
        return config, hf_neox_rope(modeling_phi, "PhiRotaryEmbedding", config)
    if name == "gptj_partial":
        config = transformers.GPTJConfig(n_embd=384, n_head=4, rotary_dim=32, n_positions=2048)
        return config, hf_gptj_rope(config)
    raise KeyError(name)


HF_CASES = ["qwen2_default", "llama_llama3", "llama_linear_legacy", "llama_yarn", "phi_partial", "gptj_partial"]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", HF_CASES)
def test_delta_matches_transformers(name: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    config, hf_rope = hf_case(name)
    delta_rope = delta_rope_for_model(config, name)
    head = delta_rope.head_size
    p, d = random_positions(gen, config.max_position_embeddings)
    x = torch.randn(NUM_TOKENS, NUM_HEADS, head, generator=gen)
    # transformers computes in the input dtype too; rotate fp32 and round, as the model's q would be.
    at_p, at_p_plus_d = hf_rope(x, p).to(dtype), hf_rope(x, p + d).to(dtype)
    assert_close(delta_rope.rotate(at_p, d), at_p_plus_d, dtype)


def test_spec_from_hf_configs() -> None:
    expectations = {  # name -> (head_size, rotary_dim, is_neox_style, rope_type, base)
        "qwen2_default": (64, 64, True, "default", 1e6),
        "llama_llama3": (64, 64, True, "llama3", 500000.0),
        "llama_linear_legacy": (64, 64, True, "linear", 1e5),
        "phi_partial": (80, 32, True, "default", 10000.0),
        "gptj_partial": (96, 32, False, "default", 10000.0),
    }
    for name, (head, rot, neox, rope_type, base) in expectations.items():
        spec = rope_spec_from_hf_config(hf_case(name)[0])
        assert (spec.head_size, spec.rotary_dim, spec.is_neox_style, spec.rope_type, spec.base) == (
            head, rot, neox, rope_type, base), name
    neox = transformers.GPTNeoXConfig(hidden_size=256, num_attention_heads=4, rotary_pct=0.25)
    assert rope_spec_from_hf_config(neox).rotary_dim == 16


# ---------------------------------------------------------------- algebra of the delta rotation


@pytest.mark.parametrize("name", list(CASES))
def test_composition_identity_norm_passthrough(name: str, gen: torch.Generator) -> None:
    delta_rope = DeltaRope(make_spec(name))
    half, rot = delta_rope.max_delta // 2, delta_rope.rotary_dim
    x = torch.randn(NUM_TOKENS, NUM_HEADS, delta_rope.head_size, generator=gen)
    a = torch.randint(-half, half + 1, (NUM_TOKENS,), generator=gen)
    b = torch.randint(-half, half + 1, (NUM_TOKENS,), generator=gen)
    twice = delta_rope.rotate(delta_rope.rotate(x, a), b)
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(twice, delta_rope.rotate(x, a + b), atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(delta_rope.rotate(delta_rope.rotate(x, a), -a), x, atol=1e-5, rtol=1e-5)
    zero = torch.zeros(NUM_TOKENS, dtype=torch.long)
    assert torch.equal(delta_rope.rotate(x, zero), x)
    assert torch.equal(delta_rope.rotate(x.bfloat16(), zero), x.bfloat16())
    out = delta_rope.rotate(x, a)
    torch.testing.assert_close(out[..., :rot].norm(dim=-1), x[..., :rot].norm(dim=-1), atol=1e-5, rtol=1e-5)
    if delta_rope.is_neox_style:
        pair_norm = torch.hypot(*out[..., :rot].chunk(2, dim=-1))
        ref_norm = torch.hypot(*x[..., :rot].chunk(2, dim=-1))
    else:
        pair_norm = torch.hypot(out[..., 0:rot:2], out[..., 1:rot:2])
        ref_norm = torch.hypot(x[..., 0:rot:2], x[..., 1:rot:2])
    torch.testing.assert_close(pair_norm, ref_norm, atol=1e-5, rtol=1e-5)  # each pair rotates alone
    assert torch.equal(out[..., rot:], x[..., rot:])
    assert not torch.equal(out[..., :rot], x[..., :rot])


@pytest.mark.parametrize("name", PARTIAL_CASES)
def test_dims_beyond_rotary_untouched_any_dtype(name: str, gen: torch.Generator) -> None:
    delta_rope = DeltaRope(make_spec(name))
    rot = delta_rope.rotary_dim
    d = torch.randint(-delta_rope.max_delta, delta_rope.max_delta + 1, (NUM_TOKENS,), generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(NUM_TOKENS, NUM_HEADS, delta_rope.head_size, generator=gen).to(dtype)
        out = delta_rope.rotate(x, d)
        assert out.dtype == dtype and torch.equal(out[..., rot:], x[..., rot:])


@pytest.mark.parametrize("name", ["default_neox", "partial_gptj"])
def test_non_contiguous_input_and_new_tensor(name: str, gen: torch.Generator) -> None:
    delta_rope = DeltaRope(make_spec(name))
    head = delta_rope.head_size
    d = torch.randint(-100, 100, (2 * NUM_TOKENS,), generator=gen)[::2]
    x = torch.randn(NUM_HEADS, NUM_TOKENS, head, generator=gen).transpose(0, 1)  # [T, H, D], strided
    wide = torch.randn(NUM_TOKENS, NUM_HEADS, 2 * head, generator=gen)[..., head:]  # e.g. a slice of qkv
    for view in (x, wide):
        assert not view.is_contiguous() and not d.is_contiguous()
        before = view.clone()
        out = delta_rope.rotate(view, d)
        assert torch.equal(out, delta_rope.rotate(view.contiguous(), d.contiguous()))
        assert torch.equal(view, before) and out.data_ptr() != view.data_ptr()


def test_cos_sin_shapes_and_sign() -> None:
    delta_rope = DeltaRope(make_spec("partial_gptj"))
    table = delta_rope.cos_sin_table
    assert table.dtype == torch.float32 and table.shape == (delta_rope.max_delta + 1, delta_rope.rotary_dim)
    delta = torch.tensor([[3, -3, 0], [delta_rope.max_delta, -delta_rope.max_delta, 1]], dtype=torch.int32)
    cos, sin = delta_rope.cos_sin(delta)
    assert cos.shape == sin.shape == (2, 3, delta_rope.rotary_dim // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[:, 0], cos[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(sin[:, 0], -sin[:, 1], atol=0, rtol=0)
    assert torch.equal(cos[0, 2], torch.ones_like(cos[0, 2])) and torch.equal(sin[0, 2], torch.zeros_like(sin[0, 2]))
    with pytest.raises(TypeError, match="integer"):
        delta_rope.cos_sin(torch.tensor([1.0]))


def test_table_fp32_even_if_shared_module_was_downcast(gen: torch.Generator) -> None:
    """get_rope shares modules; calling one with a bf16 query replaces its cache by a bf16 copy."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    spec = make_spec("default_neox")
    reference = DeltaRope(spec).cos_sin_table.clone()
    shared = get_rope(**spec.get_rope_kwargs(), dtype=torch.float32)
    original = shared.cos_sin_cache
    try:
        shared.forward_native(torch.arange(4), torch.randn(4, spec.head_size, generator=gen).bfloat16())
        assert shared.cos_sin_cache.dtype == torch.bfloat16
        _unit_cos_sin_table.cache_clear()
        assert torch.equal(DeltaRope(spec).cos_sin_table, reference)
    finally:  # the module is process-global (get_rope's cache): leave it as found
        shared.cos_sin_cache = original
        _unit_cos_sin_table.cache_clear()


# ---------------------------------------------------------------- errors


def test_delta_beyond_table_raises(gen: torch.Generator) -> None:
    delta_rope = DeltaRope(make_spec("linear"))
    assert delta_rope.max_delta == 4 * 1024 - 1  # linear: the module's cache spans max_position * factor
    x = torch.randn(2, NUM_HEADS, delta_rope.head_size, generator=gen)
    delta_rope.rotate(x, torch.tensor([delta_rope.max_delta, -delta_rope.max_delta]))  # the edge is fine
    for bad in (delta_rope.max_delta + 1, -delta_rope.max_delta - 1):
        with pytest.raises(ValueError, match=f"{abs(bad)} exceeds max_delta = {delta_rope.max_delta}"):
            delta_rope.rotate(x, torch.tensor([0, bad]))
        with pytest.raises(ValueError, match="exceeds max_delta"):
            delta_rope.cos_sin(torch.tensor([bad]))


def test_bad_shapes_and_specs() -> None:
    delta_rope = DeltaRope(make_spec("default_neox"))
    with pytest.raises(ValueError, match="expected x"):
        delta_rope.rotate(torch.zeros(3, 2, 32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="expected x"):
        delta_rope.rotate(torch.zeros(3, 2, 64), torch.zeros(4, dtype=torch.long))
    for head, rot in ((64, 63), (64, 66), (64, 0)):
        with pytest.raises(ValueError, match="rotary_dim"):
            RopeSpec(head, rot, 128, 10000.0, True, None)
    with pytest.raises(ValueError, match="factor"):
        RopeSpec(64, 64, 128, 10000.0, True, {"rope_type": "linear"})
    with pytest.raises(ValueError, match="rope_theta"):
        RopeSpec(64, 64, 128, 10000.0, True, {"rope_type": "default", "rope_theta": 5.0})


def unsupported_configs() -> dict[str, tuple[Any, str]]:
    """name -> (transformers config, rope type the error must name)."""
    longrope = transformers.Phi3Config(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=8192, original_max_position_embeddings=1024,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0] * 32, "long_factor": [4.0] * 32})
    mrope = transformers.Qwen2VLConfig(text_config={"hidden_size": 256, "num_attention_heads": 4, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}})
    unknown = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4)
    unknown.rope_parameters = {"rope_type": "spiral_warp", "rope_theta": 10000.0}
    return {"org/phi3-long": (longrope, "longrope"), "org/qwen2-vl": (mrope, "mrope"),
            "org/llama-spiral": (unknown, "spiral_warp")}


@pytest.mark.parametrize("model_name", ["org/phi3-long", "org/qwen2-vl", "org/llama-spiral"])
def test_unsupported_types_raise(model_name: str) -> None:
    config, rope_type = unsupported_configs()[model_name]
    for call in (rope_spec_from_hf_config, delta_rope_for_model):
        with pytest.raises(UnsupportedRopeError) as info:
            call(config, model_name)
        assert model_name in str(info.value) and repr(rope_type) in str(info.value)
    with pytest.raises(UnsupportedRopeError, match="'longrope'"):
        RopeSpec(64, 64, 128, 10000.0, True, {"rope_type": "longrope"})
