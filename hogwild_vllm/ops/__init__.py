"""Cache and attention ops for Hogwild! inference: one interface, the fastest implementation for the device.

    out = hogwild_attention(query, key_cache, value_cache, block_tables, table, rope, scale)

picks, by the query's device:

* CPU: the compiled op ``torch.ops.hogwild_C.hogwild_attention`` (``csrc/cpu/hogwild_attention.cpp``);
* CUDA: the Triton kernel (``ops/triton_attention.py``);
* otherwise, or when the fast one is missing (no compiled extension, no Triton), the pure-torch reference
  (``ops/reference.py``), saying so once in the log.

``HOGWILD_ATTENTION_IMPL`` (``auto`` | ``reference`` | ``ext`` | ``triton``, read once per process) forces one.
Every implementation reads any strided paged cache ``[num_blocks, block_size, Hkv, D]`` (vLLM's ``vec`` CPU
packing, where keys are stored dim-major inside a page, is such a view) and the same :class:`SegmentTable`; the
compiled CPU op and the reference also read vLLM's ``amx`` CPU packing (``packing="amx"``, see ``ops/layouts.py``).
On CPUs with AMX tiles the compiled op multiplies bf16 ``amx`` pages with them (:func:`cpu_amx_tiles`;
``HOGWILD_CPU_AMX_TILES=0`` keeps it on fp32 vectors). Pure torch: importing this package never needs vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch

from hogwild_vllm.ops.layouts import amx_unpacked
from hogwild_vllm.ops.reference import (
    DeltaRotation,
    DenseView,
    dense_view_attention_reference,
    hogwild_attention_reference,
    materialize_views_reference,
    write_kv_reference,
)
from hogwild_vllm.ops.segments import SegmentTable

IMPL_ENV = "HOGWILD_ATTENTION_IMPL"
AMX_TILES_ENV = "HOGWILD_CPU_AMX_TILES"  # "0": the CPU op keeps bf16 amx pages on fp32 vectors (read every call)
IMPLS = ("auto", "reference", "ext", "triton")
PACKINGS = {"strided": 0, "amx": 1}  # cache packing -> the compiled op's `packing` argument
logger = logging.getLogger("vllm.hogwild_vllm.ops")


def _forced_impl() -> str:
    value = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if value not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={value!r}: expected one of {', '.join(IMPLS)}")
    return value


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def attention_impl(device: torch.device) -> str:
    """The implementation :func:`hogwild_attention` uses for tensors on ``device``: ext, triton or reference."""
    return _impl_for(device.type)


@functools.cache
def _impl_for(device_type: str) -> str:
    """Decided once per process and device type (every attention layer of every step asks)."""
    forced = _forced_impl()
    if forced != "auto":
        return forced
    if device_type == "cpu":
        from hogwild_vllm.ops._ext import has_ext

        if has_ext():
            return "ext"
        _warn_once("hogwild: the compiled extension is missing, attention runs on the slow pure-torch reference "
                   "(build it with `make setup`)")
        return "reference"
    if device_type == "cuda":
        from hogwild_vllm.ops.triton_attention import has_triton

        if has_triton():
            return "triton"
        _warn_once("hogwild: Triton is not importable, attention runs on the slow pure-torch reference")
    return "reference"


def cpu_amx_tiles() -> bool:
    """Whether the compiled CPU op multiplies bf16 ``amx`` pages with AMX tiles now: the queries (rotated) and the
    softmax weights are rounded to bf16 for the tile products, sums stay fp32. False without the extension, on CPUs
    without AMX-BF16, or with ``HOGWILD_CPU_AMX_TILES=0`` (then every product is fp32 on vectors)."""
    from hogwild_vllm.ops._ext import has_ext, load_ops

    return has_ext() and bool(load_ops().cpu_amx_tiles())


@contextlib.contextmanager
def amx_tiles_switched_off(off: bool = True) -> Iterator[None]:
    """Inside (when ``off``), the compiled CPU op keeps bf16 amx pages on fp32 vectors: ``HOGWILD_CPU_AMX_TILES=0``,
    which the op reads on every call; the variable's previous value is put back after (tests, benchmarks)."""
    before = os.environ.get(AMX_TILES_ENV)
    if off:
        os.environ[AMX_TILES_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AMX_TILES_ENV, None)
        else:
            os.environ[AMX_TILES_ENV] = before


def hogwild_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, table: SegmentTable, rope: DeltaRotation, scale: float,
                      out: torch.Tensor | None = None, return_lse: bool = False, impl: str | None = None,
                      packing: str = "strided") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query token over its view (see ``hogwild_attention_reference`` for the semantics).

    query: [T, Hq, D]; block_tables: [num_seqs, max_blocks] int32; ``rope.cos_sin_table`` on the query's device.
    The caches, by ``packing``:

    * ``strided``: key_cache [num_blocks, block_size, Hkv, D] and value_cache [num_blocks, block_size, Hkv, Dv],
      any strides (``layouts.cpu_page_views`` of vLLM's ``vec`` packing, ``layouts.flash_page_views``);
    * ``amx``: vLLM's ``amx`` CPU packing (bf16 / fp16, block_size and D multiples of 32), key_cache and
      value_cache the [num_blocks, Hkv, block_size, D] page halves of ``layouts.amx_pages``; CPU only (ext and
      reference; Triton refuses it).

    ``out`` [T, Hq, Dv] (query dtype, last dim contiguous) is written in place when given. Returns out, and lse
    [T, Hq] fp32 with ``return_lse``. The fast implementations trust the table (no host sync); the reference checks
    it. ``impl`` (``reference`` | ``ext`` | ``triton``) overrides the choice of :func:`attention_impl` (tests,
    benchmarks).
    """
    impl = impl or attention_impl(query.device)
    if impl not in IMPLS[1:]:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS[1:])}")
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r}: expected one of {', '.join(PACKINGS)}")
    if packing == "amx" and impl == "triton":
        raise ValueError("packing='amx' is vLLM's CPU packing: the Triton kernel reads strided caches only "
                         "(use impl='ext' on CPU, or strided [num_blocks, block_size, Hkv, D] caches)")
    if impl == "reference":
        if packing == "amx":
            key_cache, value_cache = amx_unpacked(key_cache, value_cache)  # [num_blocks, block_size, Hkv, D] each
        result = hogwild_attention_reference(query, key_cache, value_cache, block_tables, table, rope, scale, True)
        assert isinstance(result, tuple)
        if out is not None:
            out.copy_(result[0])
            result = (out, result[1])
        return result if return_lse else result[0]
    if out is None:
        out = query.new_empty(query.shape[0], query.shape[1], value_cache.shape[3])
    lse: torch.Tensor | None = query.new_empty(query.shape[:2], dtype=torch.float32) if return_lse else None
    if impl == "ext":
        from hogwild_vllm.ops._ext import load_ops

        load_ops().hogwild_attention(out, query, key_cache, value_cache, block_tables, table.segments,
                                     table.view_offsets, table.query_view, table.query_pos, rope.cos_sin_table,
                                     rope.rotary_dim, rope.is_neox_style, float(scale), lse, PACKINGS[packing])
    else:
        from hogwild_vllm.ops.triton_attention import hogwild_attention_triton

        hogwild_attention_triton(query, key_cache, value_cache, block_tables, table, rope, scale, out, lse)
    return (out, lse) if lse is not None else out


__all__ = [
    "AMX_TILES_ENV",
    "IMPL_ENV",
    "PACKINGS",
    "DeltaRotation",
    "DenseView",
    "SegmentTable",
    "amx_tiles_switched_off",
    "attention_impl",
    "cpu_amx_tiles",
    "dense_view_attention_reference",
    "hogwild_attention",
    "hogwild_attention_reference",
    "materialize_views_reference",
    "write_kv_reference",
]
