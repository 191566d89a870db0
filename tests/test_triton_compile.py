"""The Triton kernels compile for sm_90 (H100 / H200) on a machine without a GPU (triton's bundled ptxas).

The CPU tests run the kernels in the interpreter, which does not type-check or lower them; this compiles the
decode specialization (bf16, GQA 7, head size 128, split-K) and the fp32 / partial-rotary / no-lse variants the way
a launch would specialize them (unit strides as constants, 16-divisible pointers and strides), and checks that the
K/V tiles are fetched with vectorized asynchronous copies.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")

ONE_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_btb", "stride_lh"}
INT32_POINTERS = {"block_tables_ptr", "segments_ptr", "view_offsets_ptr", "query_view_ptr", "query_pos_ptr"}
CACHE_POINTERS = {"query_ptr", "key_ptr", "value_ptr", "out_ptr"}
# (kv dtype, constexprs beyond the defaults below)
SPLIT_CASES = [
    ("bf16", {}),
    ("fp16", {"NUM_SPLITS": 1, "HAS_LSE": False, "ROT": 64, "IS_NEOX": False}),
    ("fp32", {"BLOCK_N": 32, "GROUP": 1, "NUM_HEADS": 4, "SPLIT_DOT": False, "HEAD": 80, "VHEAD": 80, "ROT": 64}),
]
DEFAULTS = {"NUM_HEADS": 28, "GROUP": 7, "GROUP_PAD": 16, "HEAD": 128, "HEAD_PAD": 128, "VHEAD": 128,
            "VHEAD_PAD": 128, "ROT": 128, "IS_NEOX": True, "BLOCK_SIZE": 16, "BLOCK_N": 64, "NUM_SPLITS": 9,
            "SPLIT_DOT": True, "UPCAST_DOT": False, "HAS_LSE": True}


def _compile(fn: Any, pointer_types: dict[str, str], constexprs: dict[str, Any], num_warps: int = 4) -> Any:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        pytest.skip(f"this triton has no ahead-of-time compile API: {error}")
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for index, name in enumerate(inspect.signature(fn).parameters):
        if name in ONE_STRIDES:
            constexprs[name] = 1
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointer_types.get(name, "*fp32") if name.endswith("_ptr") else (
            "fp32" if name == "scale_log2" else "i32")
        if name.endswith("_ptr") or name.startswith("stride_"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                              "num_stages": 2})


@pytest.mark.parametrize(("kv_dtype", "changes"), SPLIT_CASES, ids=[case[0] for case in SPLIT_CASES])
def test_split_kernel_compiles_for_sm90(kv_dtype: str, changes: dict[str, Any]) -> None:
    from hogwild_vllm.ops._triton_kernels import hogwild_split_kernel

    types = {**{name: f"*{kv_dtype}" for name in CACHE_POINTERS}, **{name: "*i32" for name in INT32_POINTERS}}
    kernel = _compile(hogwild_split_kernel, types, {**DEFAULTS, **changes})
    ptx = kernel.asm["ptx"]
    assert "cp.async" in ptx, "K/V tiles are not fetched asynchronously"
    assert kernel.asm["cubin"]


def test_merge_kernel_compiles_for_sm90() -> None:
    from hogwild_vllm.ops._triton_kernels import hogwild_merge_kernel

    constexprs = {"NUM_HEADS": 28, "NUM_SPLITS": 9, "SPLITS_PAD": 16, "VHEAD": 128, "VHEAD_PAD": 128, "HAS_LSE": True}
    kernel = _compile(hogwild_merge_kernel, {"out_ptr": "*bf16"}, constexprs)
    assert kernel.asm["cubin"]
