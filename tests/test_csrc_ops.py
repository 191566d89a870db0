"""hogwild_C::rotate_by_delta (csrc/) against a pure-torch fp32 reference written here for clarity.

Needs the compiled extension: a missing build fails (with how to build it), it is not skipped.
"""

from __future__ import annotations

import itertools
import zlib
from types import ModuleType
from typing import TypedDict

import pytest
import torch

from hogwild_vllm.ops._ext import load_ops

HEAD_SIZES = (64, 80, 128)
ROTARY_FRACTIONS = (1.0, 0.5)  # rotary_dim = head_size * fraction: full and partial rotary
NEOX = (True, False)  # neox pairs (i, i + rot/2); gpt-j pairs (2i, 2i + 1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_TOKENS = 7  # odd on purpose
NUM_HEADS = 3
TABLE_ROWS = 64  # positions in the cos/sin table: |delta| < TABLE_ROWS
ROPE_BASE = 10000.0


class Tolerance(TypedDict):
    atol: float
    rtol: float


# Output compared, in fp32, with the reference computed in fp32 from the same (already rounded) input: the only
# differences are the output rounding to dtype (half an ulp) and fp32 operation order.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
}
CASES = list(itertools.product(HEAD_SIZES, ROTARY_FRACTIONS, NEOX, DTYPES))


def case_id(case: tuple[int, float, bool, torch.dtype]) -> str:
    head_size, fraction, is_neox, dtype = case
    return f"h{head_size}-rot{int(head_size * fraction)}-{'neox' if is_neox else 'gptj'}-{str(dtype)[6:]}"


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    return load_ops()


def rope_cos_sin_table(num_rows: int, rotary_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """vLLM's cos_sin_cache layout: row d = [cos(d * inv_freq), sin(d * inv_freq)]."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # [rot/2]
    angles = torch.arange(num_rows, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [P, rot/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # [P, rot]


def rotate_by_delta_reference(
    x: torch.Tensor, delta: torch.Tensor, cos_sin_table: torch.Tensor, rotary_dim: int, is_neox: bool
) -> torch.Tensor:
    """Returns x rotated by delta, in fp32 (x is not modified)."""
    half = rotary_dim // 2
    rows = cos_sin_table[delta.abs()]  # [T, rot]
    sign = torch.where(delta < 0, -1.0, 1.0)[:, None, None]  # [T, 1, 1]: a negative delta negates sin
    cos = rows[:, None, :half]  # [T, 1, rot/2]
    sin = rows[:, None, half:] * sign  # [T, 1, rot/2]
    out = x.float().clone()  # [T, H, head_size]
    rot = out[..., :rotary_dim]  # [T, H, rot]
    x1 = rot[..., :half] if is_neox else rot[..., 0::2]  # [T, H, rot/2]
    x2 = rot[..., half:] if is_neox else rot[..., 1::2]  # [T, H, rot/2]
    o1 = x1 * cos - x2 * sin  # [T, H, rot/2]
    o2 = x2 * cos + x1 * sin  # [T, H, rot/2]
    rotated = torch.cat([o1, o2], dim=-1) if is_neox else torch.stack([o1, o2], dim=-1).flatten(-2)  # [T, H, rot]
    out[..., :rotary_dim] = rotated
    return out


def random_deltas(num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[num_tokens] int64 in (-TABLE_ROWS, TABLE_ROWS), always including 0 and both extremes when there is room."""
    delta = torch.randint(-TABLE_ROWS + 1, TABLE_ROWS, (num_tokens,), generator=generator)
    edges = torch.tensor([0, TABLE_ROWS - 1, -(TABLE_ROWS - 1)])[:num_tokens]
    delta[: len(edges)] = edges
    return delta


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(ops: ModuleType, case: tuple[int, float, bool, torch.dtype]) -> None:
    head_size, fraction, is_neox, dtype = case
    rotary_dim = int(head_size * fraction)
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    x = torch.randn(NUM_TOKENS, NUM_HEADS, head_size, generator=gen).to(dtype)  # [T, H, head_size]
    delta = random_deltas(NUM_TOKENS, gen)  # [T]
    table = rope_cos_sin_table(TABLE_ROWS, rotary_dim)  # [P, rot]
    expected = rotate_by_delta_reference(x, delta, table, rotary_dim, is_neox)
    out = x.clone()
    ops.rotate_by_delta(out, delta, table, rotary_dim, is_neox)
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:]), "dims past rotary_dim must be untouched"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", NEOX, ids=["neox", "gptj"])
def test_non_contiguous_views_touch_only_their_elements(ops: ModuleType, is_neox: bool, dtype: torch.dtype) -> None:
    head_size, rotary_dim = 80, 64
    gen = torch.Generator().manual_seed(1)
    # A slice of a bigger buffer (odd strides on tokens and heads), then a token/head transposed view.
    big = torch.randn(NUM_TOKENS + 2, NUM_TOKENS + 3, head_size + 16, generator=gen).to(dtype)
    views = {
        "slice": lambda b: b[1 : NUM_TOKENS + 1, 2 : NUM_HEADS + 2, 8 : 8 + head_size],  # [T, H, head_size]
        "transposed": lambda b: b[:NUM_HEADS, :NUM_TOKENS, :head_size].transpose(0, 1),  # [T, H, head_size]
    }
    table = rope_cos_sin_table(TABLE_ROWS, rotary_dim)  # [P, rot]
    delta = random_deltas(NUM_TOKENS, gen)  # [T]
    for name, view_of in views.items():
        buffer = big.clone()
        x = view_of(buffer)
        assert not x.is_contiguous() and x.stride(-1) == 1, name
        expected = rotate_by_delta_reference(x, delta, table, rotary_dim, is_neox)
        untouched = torch.ones_like(buffer, dtype=torch.bool)
        view_of(untouched).fill_(False)
        ops.rotate_by_delta(x, delta, table, rotary_dim, is_neox)
        torch.testing.assert_close(x.float(), expected, **TOLERANCES[dtype], msg=name)
        assert torch.equal(buffer[untouched], big[untouched]), f"{name}: elements outside the view changed"


@pytest.mark.parametrize("is_neox", NEOX, ids=["neox", "gptj"])
def test_rotations_compose(ops: ModuleType, is_neox: bool) -> None:
    """Rotating by p then by d equals rotating by p + d; rotating by d then -d is the identity (fp32)."""
    head_size, rotary_dim = 128, 96
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(NUM_TOKENS, NUM_HEADS, head_size, generator=gen)  # [T, H, head_size]
    table = rope_cos_sin_table(2 * TABLE_ROWS, rotary_dim)  # [2P, rot]
    p = torch.randint(0, TABLE_ROWS, (NUM_TOKENS,), generator=gen)  # [T]
    d = torch.randint(-TABLE_ROWS + 1, TABLE_ROWS, (NUM_TOKENS,), generator=gen)  # [T]
    two_steps = x.clone()
    ops.rotate_by_delta(two_steps, p, table, rotary_dim, is_neox)
    ops.rotate_by_delta(two_steps, d, table, rotary_dim, is_neox)
    one_step = x.clone()
    ops.rotate_by_delta(one_step, p + d, table, rotary_dim, is_neox)
    torch.testing.assert_close(two_steps, one_step, atol=1e-4, rtol=1e-4)
    there_and_back = x.clone()
    ops.rotate_by_delta(there_and_back, d, table, rotary_dim, is_neox)
    ops.rotate_by_delta(there_and_back, -d, table, rotary_dim, is_neox)
    torch.testing.assert_close(there_and_back, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, NUM_HEADS, 64), (NUM_TOKENS, 0, 64)], ids=["no-tokens", "no-heads"])
def test_empty_is_a_no_op(ops: ModuleType, shape: tuple[int, int, int]) -> None:
    x = torch.randn(shape)  # [T, H, head_size] with T or H zero
    delta = torch.zeros(shape[0], dtype=torch.int64)  # [T]
    ops.rotate_by_delta(x, delta, rope_cos_sin_table(TABLE_ROWS, 64), 64, True)
    assert x.shape == shape


@pytest.mark.parametrize("bad", [TABLE_ROWS, -TABLE_ROWS, 10**12, -(2**63)], ids=["P", "-P", "huge", "int64-min"])
def test_delta_out_of_table_raises(ops: ModuleType, bad: int) -> None:
    x = torch.randn(NUM_TOKENS, NUM_HEADS, 64)
    before = x.clone()
    delta = torch.zeros(NUM_TOKENS, dtype=torch.int64)
    delta[3] = bad
    with pytest.raises(RuntimeError, match="delta must lie in"):
        ops.rotate_by_delta(x, delta, rope_cos_sin_table(TABLE_ROWS, 64), 64, True)
    assert torch.equal(x, before), "a rejected call must not modify x"


BAD_ARGUMENTS = {
    "x-2d": (lambda: torch.randn(NUM_TOKENS, 64), None, None, 64, "x must be"),
    "x-int": (lambda: torch.zeros(NUM_TOKENS, 2, 64, dtype=torch.int32), None, None, 64, "float32, bfloat16"),
    "x-last-dim-strided": (lambda: torch.randn(NUM_TOKENS, 2, 128)[..., ::2], None, None, 64, "contiguous"),
    "rotary-odd": (None, None, lambda: rope_cos_sin_table(TABLE_ROWS, 64)[:, :63], 63, "rotary_dim"),
    "rotary-too-big": (lambda: torch.randn(NUM_TOKENS, 2, 32), None, None, 64, "rotary_dim"),
    "delta-int32": (None, lambda: torch.zeros(NUM_TOKENS, dtype=torch.int32), None, 64, "int64"),
    "delta-length": (None, lambda: torch.zeros(NUM_TOKENS + 1, dtype=torch.int64), None, 64, "delta must be"),
    "table-width": (None, None, lambda: rope_cos_sin_table(TABLE_ROWS, 32), 64, "cos_sin_table must be"),
    "table-fp16": (None, None, lambda: rope_cos_sin_table(TABLE_ROWS, 64).half(), 64, "float32"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_raise(ops: ModuleType, name: str) -> None:
    make_x, make_delta, make_table, rotary_dim, message = BAD_ARGUMENTS[name]
    x = make_x() if make_x else torch.randn(NUM_TOKENS, 2, 64)  # [T, H, head_size]
    delta = make_delta() if make_delta else torch.zeros(NUM_TOKENS, dtype=torch.int64)  # [T]
    table = make_table() if make_table else rope_cos_sin_table(TABLE_ROWS, 64)  # [P, rot]
    with pytest.raises(RuntimeError, match=message):
        ops.rotate_by_delta(x, delta, table, rotary_dim, True)


@pytest.mark.parametrize("is_neox", NEOX, ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(ops: ModuleType, is_neox: bool, dtype: torch.dtype) -> None:
    """Schema (mutation declared by Tensor!), fake impl, and torch.compile / AOT dispatch tracing."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(NUM_TOKENS, NUM_HEADS, 80, generator=gen).to(dtype)  # [T, H, head_size]
    delta = random_deltas(NUM_TOKENS, gen)  # [T]
    table = rope_cos_sin_table(TABLE_ROWS, 64)  # [P, rot]
    torch.library.opcheck(ops.rotate_by_delta.default, (x, delta, table, 64, is_neox))


def test_compiles_with_torch_compile(ops: ModuleType) -> None:
    """The fake impl lets torch.compile trace the in-place op inside a graph (no graph break)."""

    def rotate_then_scale(x: torch.Tensor, delta: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ops.rotate_by_delta(x, delta, table, 64, True)
        return x * 2.0

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(NUM_TOKENS, NUM_HEADS, 64, generator=gen)  # [T, H, head_size]
    delta = random_deltas(NUM_TOKENS, gen)  # [T]
    table = rope_cos_sin_table(TABLE_ROWS, 64)  # [P, rot]
    expected = rotate_by_delta_reference(x, delta, table, 64, True) * 2.0
    compiled = torch.compile(rotate_then_scale, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.clone(), delta, table), expected, **TOLERANCES[torch.float32])
