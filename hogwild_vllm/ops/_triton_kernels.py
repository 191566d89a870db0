"""Triton kernels of the Hogwild! paged attention; launched by :mod:`hogwild_vllm.ops.triton_attention`.

This module imports triton at the top: import it only where triton is importable (``has_triton()``).

The kernels are written as plain functions and wrapped by :func:`kernels` once per mode: compiled (``triton.jit``)
for GPU tensors, interpreted (``InterpretedFunction``, numpy on the host) for CPU tensors. The interpreted pair is
built directly, so running on CPU never needs ``TRITON_INTERPRET=1`` in the environment (triton reads that
variable when a function is decorated, and setting ``triton.knobs.runtime.interpret`` writes it to os.environ,
where child processes would inherit it).

Split kernel, grid (T, Hkv, NUM_SPLITS): one program = one query token, one KV head (all GROUP query heads of it,
padded to GROUP_PAD >= 16 rows for tl.dot), one split of the view's visible key range. It loops over the view's
segments (loop bounds read from the table), rotates the query in registers once per segment that meets its range,
and runs an online softmax over tiles of BLOCK_N keys gathered through the block table. With one split it writes
(out, lse) itself; otherwise it writes fp32 partials and the merge kernel, grid (T, Hq), combines them by
log-sum-exp. Scores are kept in log2 units (the scale is pre-multiplied by log2(e)).

Precision: fp32 accumulation. 16-bit caches: the rotated query (and the probabilities) are split into a high and a
low 16-bit part, two tensor-core dots each, so scores keep ~16 mantissa bits instead of 8. fp32 caches: ieee dots.
UPCAST_DOT casts the 16-bit dot operands to fp32 first (exact): the triton 3.9 interpreter's tl.dot multiplies
bf16 operands as their raw uint16 bit patterns, so the interpreted kernels set it.

No ``triton.language`` helper that is itself a ``@triton.jit`` function (tl.max, tl.sum, tl.zeros, tl.cdiv, ...):
triton decorates those when it is imported, as interpreted functions only if TRITON_INTERPRET=1 was set by then,
and a compiled one cannot run inside the interpreter. Reductions are ``tl.reduce`` with the combine functions below.
"""

import functools
from typing import Any

import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]
from triton.runtime.interpreter import InterpretedFunction  # type: ignore[import-untyped]


def _maximum(a: tl.tensor, b: tl.tensor) -> tl.tensor:
    return tl.maximum(a, b)


def _add(a: tl.tensor, b: tl.tensor) -> tl.tensor:
    return a + b


# Combine functions for tl.reduce (the kernels call no tl.max / tl.sum: see the module docstring). Triton's own, when
# it has them, are what tl.max / tl.sum use and what the interpreter reduces with numpy; ours otherwise.
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", None) or triton.jit(_maximum)
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", None) or triton.jit(_add)


def hogwild_split_kernel(
    query_ptr: tl.tensor,  # [T, Hq, D]
    key_ptr: tl.tensor,  # [num_blocks, block_size, Hkv, D], any strides
    value_ptr: tl.tensor,  # [num_blocks, block_size, Hkv, Dv], any strides
    block_tables_ptr: tl.tensor,  # [num_seqs, max_blocks] int32
    segments_ptr: tl.tensor,  # [S, 4] int32, contiguous
    view_offsets_ptr: tl.tensor,  # [V + 1] int32, contiguous
    query_view_ptr: tl.tensor,  # [T] int32, contiguous
    query_pos_ptr: tl.tensor,  # [T, 2] int32, contiguous
    cos_sin_ptr: tl.tensor,  # [rows, ROT] fp32, contiguous
    out_ptr: tl.tensor,  # [T, Hq, Dv] (written when NUM_SPLITS == 1)
    lse_ptr: tl.tensor,  # [T, Hq] fp32 (written when NUM_SPLITS == 1 and HAS_LSE)
    part_out_ptr: tl.tensor,  # [T, Hq, NUM_SPLITS, VHEAD_PAD] fp32 (written when NUM_SPLITS > 1)
    part_lse_ptr: tl.tensor,  # [T, Hq, NUM_SPLITS] fp32, log2 units (written when NUM_SPLITS > 1)
    scale_log2: tl.tensor,  # softmax scale * log2(e)
    cos_sin_rows: tl.tensor,
    stride_qt: tl.tensor, stride_qh: tl.tensor, stride_qd: tl.tensor,
    stride_kb: tl.tensor, stride_ko: tl.tensor, stride_kh: tl.tensor, stride_kd: tl.tensor,
    stride_vb: tl.tensor, stride_vo: tl.tensor, stride_vh: tl.tensor, stride_vd: tl.tensor,
    stride_bts: tl.tensor, stride_btb: tl.tensor,
    stride_ot: tl.tensor, stride_oh: tl.tensor, stride_od: tl.tensor,
    stride_lt: tl.tensor, stride_lh: tl.tensor,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, VHEAD: tl.constexpr, VHEAD_PAD: tl.constexpr,
    ROT: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, HAS_LSE: tl.constexpr,
) -> None:
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g  # [G]
    head_ok = g < GROUP
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    dv = tl.arange(0, VHEAD_PAD)
    dv_ok = dv < VHEAD
    offs_n = tl.arange(0, BLOCK_N)

    # RoPE pairing: rotated[d] = q[d] * cos[freq[d]] + q[partner[d]] * pair_sign[d] * sin[freq[d]], d < ROT.
    half = ROT // 2
    rot = d < ROT
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        freq = tl.where(first, d, d - half)
    else:
        first = (d % 2) == 0
        partner = tl.where(first, d + 1, d - 1)
        freq = d // 2
    partner = tl.where(rot, partner, d)
    freq = tl.where(rot, freq, 0)
    pair_sign = tl.where(first, -1.0, 1.0)  # [D]

    q_rows = query_ptr + token * stride_qt + heads[:, None] * stride_qh  # [G, 1]

    view = tl.load(query_view_ptr + token)
    n_q = tl.load(query_pos_ptr + 2 * token)
    p_q = tl.load(query_pos_ptr + 2 * token + 1)
    seg_begin = tl.load(view_offsets_ptr + view)
    seg_end = tl.load(view_offsets_ptr + view + 1)
    visible_end = p_q + 1  # keys at view positions < visible_end are visible
    if NUM_SPLITS == 1:
        split_lo = visible_end * 0
        split_hi = visible_end
    else:
        # The visible range [lo, hi) of the view, cut into NUM_SPLITS chunks of whole tiles.
        lo = visible_end
        hi = visible_end * 0
        for s in range(seg_begin, seg_end):
            length = tl.load(segments_ptr + 4 * s + 2)
            view_start = tl.load(segments_ptr + 4 * s + 3)
            lo = tl.where(length > 0, tl.minimum(lo, view_start), lo)
            hi = tl.where(length > 0, tl.maximum(hi, view_start + length), hi)
        hi = tl.minimum(hi, visible_end)
        span = tl.maximum(hi - lo, 0)
        chunk = (span + NUM_SPLITS - 1) // NUM_SPLITS
        chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        split_lo = lo + split * chunk
        split_hi = tl.minimum(split_lo + chunk, hi)

    kv_dtype = key_ptr.dtype.element_ty
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([GROUP_PAD], 0.0, tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.full([GROUP_PAD, VHEAD_PAD], 0.0, tl.float32)
    for s in range(seg_begin, seg_end):
        seq = tl.load(segments_ptr + 4 * s)
        start = tl.load(segments_ptr + 4 * s + 1)
        length = tl.load(segments_ptr + 4 * s + 2)
        view_start = tl.load(segments_ptr + 4 * s + 3)
        lo_s = tl.maximum(view_start, split_lo)  # this program's view positions of this segment: [lo_s, hi_s)
        hi_s = tl.minimum(view_start + length, split_hi)
        if lo_s < hi_s:
            delta = (p_q - n_q) - (view_start - start)
            row = tl.minimum(tl.abs(delta), cos_sin_rows - 1)
            cos = tl.load(cos_sin_ptr + row * ROT + freq, mask=rot, other=1.0)  # [D]
            sin = tl.load(cos_sin_ptr + row * ROT + half + freq, mask=rot, other=0.0)  # [D]
            sin = sin * pair_sign * tl.where(delta < 0, -1.0, 1.0)
            # The query is (re)loaded per segment, a cache hit, rather than held in registers across the key loop.
            q = tl.load(q_rows + d[None, :] * stride_qd, mask=head_ok[:, None] & d_ok[None, :], other=0.0)
            q_pair = tl.load(q_rows + partner[None, :] * stride_qd, mask=head_ok[:, None] & rot[None, :], other=0.0)
            q_seg = (q.to(tl.float32) * cos[None, :] + q_pair.to(tl.float32) * sin[None, :]) * scale_log2  # [G, D]
            if SPLIT_DOT:
                q_hi = q_seg.to(kv_dtype)
                q_lo = (q_seg - q_hi.to(tl.float32)).to(kv_dtype)
            table_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
            for pos in range(lo_s, hi_s, BLOCK_N):
                view_pos = pos + offs_n  # [N]
                key_ok = view_pos < hi_s
                token_idx = start + (view_pos - view_start)  # [N] index in the sequence
                block = tl.load(table_row + (token_idx // BLOCK_SIZE) * stride_btb, mask=key_ok, other=0)
                block = block.to(tl.int64)
                offset = token_idx % BLOCK_SIZE
                k_tok = block * stride_kb + offset * stride_ko + kv_head * stride_kh  # [N]
                k = tl.load(key_ptr + k_tok[None, :] + d[:, None] * stride_kd,
                            mask=d_ok[:, None] & key_ok[None, :], other=0.0)  # [D, N]
                if SPLIT_DOT:
                    if UPCAST_DOT:
                        k32 = k.to(tl.float32)
                        score = tl.dot(q_hi.to(tl.float32), k32, input_precision="ieee")
                        score = tl.dot(q_lo.to(tl.float32), k32, score, input_precision="ieee")
                    else:
                        score = tl.dot(q_hi, k)
                        score = tl.dot(q_lo, k, score)
                else:
                    score = tl.dot(q_seg, k.to(tl.float32), input_precision="ieee")  # [G, N]
                score = tl.where(key_ok[None, :], score, float("-inf"))
                # finite: every tile holds a visible key
                m_new = tl.maximum(m_i, tl.reduce(score, 1, _MAX_COMBINE))
                alpha = tl.exp2(m_i - m_new)  # [G]
                p = tl.exp2(score - m_new[:, None])  # [G, N]
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
                v_tok = block * stride_vb + offset * stride_vo + kv_head * stride_vh  # [N]
                v = tl.load(value_ptr + v_tok[:, None] + dv[None, :] * stride_vd,
                            mask=key_ok[:, None] & dv_ok[None, :], other=0.0)  # [N, Dv]
                if SPLIT_DOT:
                    p_hi = p.to(kv_dtype)
                    p_lo = (p - p_hi.to(tl.float32)).to(kv_dtype)
                    if UPCAST_DOT:
                        v32 = v.to(tl.float32)
                        pv = tl.dot(p_hi.to(tl.float32), v32, input_precision="ieee")
                        pv = tl.dot(p_lo.to(tl.float32), v32, pv, input_precision="ieee")
                    else:
                        pv = tl.dot(p_hi, v)
                        pv = tl.dot(p_lo, v, pv)
                else:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")  # [G, Dv]
                acc = acc * alpha[:, None] + pv
                m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    result = acc / l_safe[:, None]  # [G, Dv], zeros without keys
    lse2 = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # [G]
    if NUM_SPLITS == 1:
        o = out_ptr + token * stride_ot + heads[:, None] * stride_oh + dv[None, :] * stride_od
        tl.store(o, result.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dv_ok[None, :])
        if HAS_LSE:
            tl.store(lse_ptr + token * stride_lt + heads * stride_lh, lse2 * 0.6931471805599453, mask=head_ok)
    else:
        part = (token * NUM_HEADS + heads) * NUM_SPLITS + split  # [G]
        tl.store(part_out_ptr + part[:, None] * VHEAD_PAD + dv[None, :], result, mask=head_ok[:, None])
        tl.store(part_lse_ptr + part, lse2, mask=head_ok)


def hogwild_merge_kernel(
    part_out_ptr: tl.tensor,  # [T, Hq, NUM_SPLITS, VHEAD_PAD] fp32
    part_lse_ptr: tl.tensor,  # [T, Hq, NUM_SPLITS] fp32, log2 units
    out_ptr: tl.tensor,  # [T, Hq, Dv], written
    lse_ptr: tl.tensor,  # [T, Hq] fp32, written when HAS_LSE
    stride_ot: tl.tensor, stride_oh: tl.tensor, stride_od: tl.tensor,
    stride_lt: tl.tensor, stride_lh: tl.tensor,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    VHEAD: tl.constexpr, VHEAD_PAD: tl.constexpr, HAS_LSE: tl.constexpr,
) -> None:
    """Grid (T, Hq): one softmax from the NUM_SPLITS partial ones of a (token, head) over disjoint key sets."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < NUM_SPLITS
    dv = tl.arange(0, VHEAD_PAD)
    dv_ok = dv < VHEAD
    part = (token * NUM_HEADS + head) * NUM_SPLITS + sp  # [P]
    lse2 = tl.load(part_lse_ptr + part, mask=sp_ok, other=float("-inf"))  # [P]
    top = tl.reduce(lse2, 0, _MAX_COMBINE)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse2 - top)  # [P], 0 for empty splits
    total = tl.reduce(weight, 0, _SUM_COMBINE)
    partial = tl.load(part_out_ptr + part[:, None] * VHEAD_PAD + dv[None, :],
                      mask=sp_ok[:, None] & dv_ok[None, :], other=0.0)  # [P, Dv]
    total_safe = tl.where(total > 0.0, total, 1.0)
    result = tl.reduce(partial * weight[:, None], 0, _SUM_COMBINE) / total_safe  # [Dv]
    o = out_ptr + token * stride_ot + head * stride_oh + dv * stride_od
    tl.store(o, result.to(out_ptr.dtype.element_ty), mask=dv_ok)
    if HAS_LSE:
        lse = tl.where(total > 0.0, (top + tl.log2(total_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + token * stride_lt + head * stride_lh, lse)


@functools.cache
def kernels(interpret: bool) -> tuple[Any, Any]:
    """(split kernel, merge kernel): interpreted on the host when ``interpret``, else ``triton.jit`` compiled."""
    if interpret:
        return InterpretedFunction(hogwild_split_kernel), InterpretedFunction(hogwild_merge_kernel)
    return triton.jit(hogwild_split_kernel), triton.jit(hogwild_merge_kernel)
