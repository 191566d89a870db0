"""Rotation of queries by a position delta, with the model's own RoPE frequencies.

Hogwild! workers read keys cached post-RoPE at their *natural* position n but must see them at
their own *view* position v. RoPE angles are linear in the position, so for a query at p:
``<R(p) q, R(v) k> == <R(p + n - v) q, R(n) k>``: rotate the (already rotated) query by
``delta = n - v`` instead of re-rotating the cache. ``delta`` may be negative.

The single source of truth for the angles is vLLM's own rotary module (``get_rope``): we read its
``cos_sin_cache`` and divide out the magnitude (YaRN bakes ``mscale`` into cos/sin; the model
applies it once at ``p``, the delta rotation must never apply it again).

Only variants whose angle is a linear function of the position are accepted: default, linear,
llama3, dynamic (NTK) and yarn. vLLM's "dynamic" is static (a fixed enlarged base, a function of
the distance only). transformers' dynamic NTK instead recomputes the frequencies from the current
sequence length; we follow vLLM, which is what serves the model. longrope switches factor at a
threshold and mrope is multi-axis: both, and every other type, raise ``UnsupportedRopeError``.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES: frozenset[str] = frozenset({"default", "linear", "llama3", "dynamic", "yarn"})
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_UNSUPPORTED_KEYS = ("mrope_section", "xdrope_section", "mrope_interleaved", "use_fope")
# Model types whose vLLM implementation hard-codes GPT-J (interleaved) pairing.
_GPTJ_STYLE_MODEL_TYPES = frozenset({"gptj", "glm4", "cohere", "cohere2"})
# Keys that RopeSpec carries as fields (base, rotary_dim); they are stripped from rope_parameters.
_FIELD_KEYS = ("rope_theta", "partial_rotary_factor", "rope_dim", "type")


class UnsupportedRopeError(ValueError):
    """The model's RoPE is not a pure function of the position distance (or is unknown)."""


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unsupported(rope_type: str, model_name: str, why: str) -> UnsupportedRopeError:
    return UnsupportedRopeError(
        f"Hogwild! delta-RoPE: model {model_name or '<unnamed>'!r} uses rope type {rope_type!r}, "
        f"which is not supported ({why}); supported types: {sorted(SUPPORTED_ROPE_TYPES)}"
    )


@dataclass(frozen=True)
class RopeSpec:
    """Everything ``get_rope`` needs. ``rope_parameters`` holds the type-specific keys
    (rope_type, factor, ...); base and rotary_dim are fields and must not be repeated there."""

    head_size: int
    rotary_dim: int
    max_position: int
    base: float
    is_neox_style: bool
    rope_parameters: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.head_size <= 0 or self.max_position <= 0 or self.base <= 0:
            raise ValueError(f"head_size, max_position and base must be positive: {self}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_size:
            raise ValueError(f"rotary_dim must be even and in (0, head_size]: {self}")
        params = {k: _freeze(v) for k, v in (self.rope_parameters or {}).items()}
        for key in _FIELD_KEYS:
            if key in params and key != "type":
                raise ValueError(f"rope_parameters[{key!r}] must be given as a RopeSpec field")
        params.pop("type", None)
        rope_type = params.setdefault("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise _unsupported(rope_type, "", "unknown or position-dependent variant")
        if bad := [k for k in _UNSUPPORTED_KEYS if params.get(k)]:
            raise _unsupported(rope_type, "", f"multi-axis / fourier parameters {bad}")
        missing = [k for k in _REQUIRED_KEYS.get(rope_type, ()) if k not in params]
        if rope_type == "dynamic" and "factor" not in params and "alpha" not in params:
            missing.append("factor")
        if missing:
            raise ValueError(f"rope type {rope_type!r} needs rope_parameters {missing}")
        if "factor" in params:  # vLLM's linear scaling iterates over an int factor
            params["factor"] = float(params["factor"])
        object.__setattr__(self, "rope_parameters", types.MappingProxyType(params))

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]  # type: ignore[index]

    def __hash__(self) -> int:
        items = frozenset(self.rope_parameters.items())  # type: ignore[union-attr]
        return hash((self.head_size, self.rotary_dim, self.max_position, self.base, self.is_neox_style, items))

    def get_rope_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm...rotary_embedding.get_rope`` (rotary_dim passed as rope_dim)."""
        params = dict(self.rope_parameters or {}, rope_theta=self.base, rope_dim=self.rotary_dim)
        return dict(head_size=self.head_size, max_position=self.max_position,
                    is_neox_style=self.is_neox_style, rope_parameters=params)


def rope_spec_from_hf_config(config: Any, model_name: str = "") -> RopeSpec:
    """Read head size, theta, partial rotary, pairing style and scaling from a transformers config.

    Accepts ``rope_parameters`` (transformers >= 5) or legacy ``rope_scaling``/``rope_theta``,
    ``partial_rotary_factor``/``rotary_pct``/``rotary_emb_fraction`` and GPT-J's ``rotary_dim``.
    Raises ``UnsupportedRopeError`` (naming model and type) for anything not in SUPPORTED_ROPE_TYPES.
    """
    from vllm.transformers_utils.config import uses_mrope

    name = model_name or getattr(config, "name_or_path", "") or getattr(config, "model_type", "")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    raw = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    params = dict(raw)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise _unsupported("per-layer-type", name, f"one rope per layer type: {sorted(params)}")
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _unsupported(rope_type, name, "unknown or not a function of the position distance")
    if uses_mrope(config) or any(params.get(k) for k in _UNSUPPORTED_KEYS):
        raise _unsupported("mrope", name, f"multimodal / multi-axis rope, rope_type {rope_type!r}")
    if getattr(text, "dual_chunk_attention_config", None):
        raise _unsupported(rope_type, name, "dual chunk attention remaps positions")

    def first(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    head_size = first(getattr(text, "head_dim", None))
    if head_size is None:
        head_size = text.hidden_size // text.num_attention_heads
    base = first(params.get("rope_theta"), getattr(text, "rope_theta", None),
                 getattr(text, "rotary_emb_base", None), 10000.0)
    model_type = getattr(text, "model_type", "")
    gptj_rotary_dim = getattr(text, "rotary_dim", None)
    if params.get("rope_dim") is not None:
        rotary_dim = int(params["rope_dim"])
    elif gptj_rotary_dim is not None:
        rotary_dim = int(gptj_rotary_dim)
    else:
        factor = first(params.get("partial_rotary_factor"), getattr(text, "partial_rotary_factor", None),
                       getattr(text, "rotary_pct", None), getattr(text, "rotary_emb_fraction", None), 1.0)
        rotary_dim = int(head_size * factor)
    max_position = first(getattr(text, "max_position_embeddings", None), getattr(text, "seq_length", None))
    if max_position is None:
        raise ValueError(f"model {name!r}: config has no max_position_embeddings")
    rest = {k: v for k, v in params.items() if k not in _FIELD_KEYS}
    rest["rope_type"] = rope_type
    return RopeSpec(head_size=int(head_size), rotary_dim=rotary_dim, max_position=int(max_position),
                    base=float(base), is_neox_style=model_type not in _GPTJ_STYLE_MODEL_TYPES,
                    rope_parameters=rest)


@functools.cache
def _fallback_vllm_config() -> Any:
    from vllm.config import VllmConfig

    return VllmConfig()


@functools.lru_cache(maxsize=32)
def _unit_cos_sin_table(spec: RopeSpec, device: torch.device) -> torch.Tensor:
    """[L, rotary_dim] fp32 unit-magnitude cos|sin for positions 0..L-1 of vLLM's module."""
    from vllm.config import get_current_vllm_config_or_none, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    # get_rope instantiates a CustomOp, whose dispatch reads the current vLLM config.
    if get_current_vllm_config_or_none() is None:
        with set_current_vllm_config(_fallback_vllm_config()):
            module = get_rope(**spec.get_rope_kwargs(), dtype=torch.float32)
    else:
        module = get_rope(**spec.get_rope_kwargs(), dtype=torch.float32)
    cache = module.cos_sin_cache
    if cache.dtype != torch.float32:  # shared module was called with a lower-precision query
        cache = module._compute_cos_sin_cache()
    cos, sin = cache.to(device=device, dtype=torch.float32).chunk(2, dim=-1)
    magnitude = torch.hypot(cos, sin)
    scale = magnitude.mean().item()
    if not torch.allclose(magnitude, torch.full_like(magnitude, scale), rtol=1e-4, atol=0):
        raise UnsupportedRopeError(f"{type(module).__name__}: cos/sin magnitude is not uniform")
    expected = float(getattr(module, "mscale", 1.0))
    assert abs(scale - expected) <= 1e-4 * expected, (scale, expected)
    return torch.cat((cos / magnitude, sin / magnitude), dim=-1).contiguous()


class DeltaRope:
    """Rotation by a position delta, exactly as the model's RoPE rotates, without any magnitude scale.

    ``cos_sin_table``: [max_delta + 1, rotary_dim] fp32 on ``device``, cos of the angle of delta d in
    the first half, sin in the second, unit magnitude. Shared per (spec, device); never mutate it.
    ``max_delta``: last row of vLLM's own cache (max_position, x factor for linear / yarn).
    """

    def __init__(self, spec: RopeSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.head_size = spec.head_size
        self.rotary_dim = spec.rotary_dim
        self.is_neox_style = spec.is_neox_style
        self.cos_sin_table: torch.Tensor = _unit_cos_sin_table(spec, torch.device(device))
        self.max_delta: int = self.cos_sin_table.shape[0] - 1

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """delta: integer tensor of any shape -> (cos, sin), each [*delta.shape, rotary_dim // 2] fp32.
        Negative delta negates sin. |delta| > max_delta raises ValueError (one host sync for the check)."""
        if delta.dtype.is_floating_point or delta.dtype.is_complex or delta.dtype == torch.bool:
            raise TypeError(f"delta must be an integer tensor, got {delta.dtype}")
        magnitude = delta.to(self.cos_sin_table.device, torch.long).abs()
        if magnitude.numel() and (worst := int(magnitude.max())) > self.max_delta:
            raise ValueError(f"|delta| = {worst} exceeds max_delta = {self.max_delta} of the RoPE table "
                             f"({self.spec.rope_type}, max_position={self.spec.max_position})")
        cos, sin = self.cos_sin_table[magnitude].chunk(2, dim=-1)
        sin = torch.where((delta < 0).to(sin.device).unsqueeze(-1), -sin, sin)
        return cos, sin

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x: [T, H, head_size] (any float dtype), delta: [T] ints -> new [T, H, head_size] tensor of
        x's dtype whose first rotary_dim dims per head are rotated by delta[t] positions (fp32 math)."""
        if x.dim() != 3 or x.shape[-1] != self.head_size or delta.shape != (x.shape[0],):
            raise ValueError(f"expected x [T, H, {self.head_size}] and delta [T], got "
                             f"{tuple(x.shape)} and {tuple(delta.shape)}")
        cos, sin = self.cos_sin(delta)
        cos, sin = cos.to(x.device).unsqueeze(1), sin.to(x.device).unsqueeze(1)  # [T, 1, rot/2]
        rot = x[..., : self.rotary_dim].float()
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if self.is_neox_style:
            rotated = torch.cat((y1, y2), dim=-1)
        else:
            rotated = torch.stack((y1, y2), dim=-1).flatten(-2)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out[..., : self.rotary_dim] = rotated
        out[..., self.rotary_dim :] = x[..., self.rotary_dim :]
        return out


def delta_rope_for_model(hf_config: Any, model_name: str = "", device: torch.device | str = "cpu") -> DeltaRope:
    """DeltaRope for a transformers config (see ``rope_spec_from_hf_config``)."""
    return DeltaRope(rope_spec_from_hf_config(hf_config, model_name), device)
