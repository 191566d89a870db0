"""Pure-PyTorch fp32 references for the Hogwild! cache and attention ops: the oracle for the kernels and the fallback.

Paged cache (vLLM layout): token i of sequence s lives in block ``block_tables[s, i // block_size]`` at offset
``i % block_size``. A token's index in its sequence is its natural position; its key is stored rotated by RoPE there.
A view is an ordered list of segments ``(seq, start, length, view_start)``: tokens start..start+length-1 of ``seq``
sit at view positions view_start..view_start+length-1. A query (rotated at natural position n_q, at view position p_q)
attends like dense causal attention over its view: a key is visible iff its view position <= p_q, and the keys are
never rewritten; instead the query is rotated per segment by ``(p_q - n_q) - (view_start - start)``.
Written for clarity, not speed: Python loops over views and segments, fp32 math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hogwild_vllm.ops.segments import SegmentTable, check_table_values

NEG_INF = float("-inf")


class DeltaRotation(Protocol):
    """What the references need from a RoPE variant (``hogwild_vllm.rope.DeltaRope`` satisfies it)."""

    head_size: int
    rotary_dim: int
    is_neox_style: bool
    # [rows, rotary_dim] fp32, row d = cos | sin of delta d's angles (unit magnitude); what the kernels read
    cos_sin_table: torch.Tensor

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x: [T, H, head_size]; delta: [T] int64. A new tensor, the rotary dims of row t rotated by delta[t]."""
        ...


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _gather_tokens(cache: torch.Tensor, block_row: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Tokens start..start+length-1 of one sequence. cache: [num_blocks, block_size, H, D] -> [length, H, D]."""
    block_size = cache.shape[1]
    index = torch.arange(start, start + length, device=cache.device)  # [length]
    blocks = block_row.to(cache.device).long()[index // block_size]  # [length]
    return cache[blocks, index % block_size]  # [length, H, D]


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each token's key and value at its cache slot. Modifies key_cache and value_cache in place.

    key: [T, Hkv, D]; value: [T, Hkv, Dv]; key_cache: [num_blocks, block_size, Hkv, D]; value_cache:
    [num_blocks, block_size, Hkv, Dv]; slot_mapping: [T] int64, slot = block * block_size + offset. Tokens with
    slot < 0 (padding) are skipped; no slot may appear twice. Values are cast to the cache dtype.
    """
    num_blocks, block_size = key_cache.shape[:2]
    _check(slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1, "slot_mapping must be [T] int64")
    _check(key.shape[0] == value.shape[0] == slot_mapping.shape[0], "key, value, slot_mapping need one row a token")
    _check(key.shape[1:] == key_cache.shape[2:], "key must be [T, Hkv, D] matching key_cache")
    _check(value.shape[1:] == value_cache.shape[2:], "value must be [T, Hkv, Dv] matching value_cache")
    _check(value_cache.shape[:2] == key_cache.shape[:2], "key_cache and value_cache need the same blocks")
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep]  # [T']
    _check(bool((slots < num_blocks * block_size).all()), "slot_mapping points past the cache")
    _check(slots.unique().numel() == slots.numel(), "slot_mapping writes one slot twice")
    block, offset = slots // block_size, slots % block_size  # [T'] each
    key_cache[block, offset] = key[keep].to(key_cache.dtype)  # [T', Hkv, D]
    value_cache[block, offset] = value[keep].to(value_cache.dtype)  # [T', Hkv, Dv]


def _exp_minus(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(x - m) elementwise (m broadcast), and 0 where m is -inf (nothing visible, so no weight)."""
    return torch.where(m == NEG_INF, 0.0, torch.exp(x - m))


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor,
           out_b: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from two over disjoint key sets. out_*: [T, H, Dv] normalized; lse_*: [T, H]."""
    lse = torch.logaddexp(lse_a, lse_b)  # [T, H]
    out = out_a * _exp_minus(lse_a, lse)[..., None] + out_b * _exp_minus(lse_b, lse)[..., None]  # [T, H, Dv]
    return out, lse


def hogwild_attention_reference(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_tables: torch.Tensor, table: SegmentTable, rope: DeltaRotation,
                                scale: float, return_lse: bool = False
                                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query token over its view, one rotated query copy per (query, segment). Reads only.

    query: [T, Hq, D] rotated at natural positions; key_cache: [num_blocks, block_size, Hkv, D]; value_cache:
    [num_blocks, block_size, Hkv, Dv]; block_tables: [num_seqs, max_blocks] int32. Query head h reads KV head
    h // (Hq // Hkv). The segments of a view are merged into one softmax by log-sum-exp.
    Returns out [T, Hq, Dv] in query dtype, and with return_lse also lse [T, Hq] fp32 (natural log of the sum of
    exp(scale * score) over visible keys). A query with no visible key gets zeros and lse = -inf.
    """
    num_tokens, num_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    _check(num_tokens == table.num_tokens, "query and table.query_view need one row a token")
    _check(key_cache.shape[3] == head_size, "query and key_cache need the same head size")
    _check(num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads")
    _check(value_cache.shape[:3] == key_cache.shape[:3], "key_cache and value_cache need the same blocks and heads")
    check_table_values(table, block_tables, block_size)
    group = num_heads // num_kv_heads
    out = query.new_zeros(num_tokens, num_heads, value_cache.shape[3], dtype=torch.float32)  # [T, Hq, Dv]
    lse = query.new_full((num_tokens, num_heads), NEG_INF, dtype=torch.float32)  # [T, Hq]
    for view in range(table.num_views):
        rows = torch.nonzero(table.query_view == view).squeeze(1)  # [Tv]
        if rows.numel() == 0:
            continue
        n_q, p_q = table.query_pos[rows].long().unbind(1)  # [Tv] each
        q = query[rows].float()  # [Tv, Hq, D]
        out_v, lse_v = out[rows], lse[rows]  # [Tv, Hq, Dv], [Tv, Hq]
        for seq, start, length, view_start in table.view_segments(view):
            if length == 0:
                continue
            keys = _gather_tokens(key_cache, block_tables[seq], start, length)  # [Ls, Hkv, D]
            values = _gather_tokens(value_cache, block_tables[seq], start, length)  # [Ls, Hkv, Dv]
            keys = keys.float().repeat_interleave(group, dim=1)  # [Ls, Hq, D]
            values = values.float().repeat_interleave(group, dim=1)  # [Ls, Hq, Dv]
            q_seg = rope.rotate(q, (p_q - n_q) - (view_start - start))  # [Tv, Hq, D]
            scores = torch.einsum("thd,khd->thk", q_seg, keys) * scale  # [Tv, Hq, Ls]
            key_view_pos = torch.arange(view_start, view_start + length, device=q.device)  # [Ls]
            visible = key_view_pos[None, :] <= p_q[:, None]  # [Tv, Ls]
            scores = scores.masked_fill(~visible[:, None, :], NEG_INF)  # [Tv, Hq, Ls]
            seg_lse = torch.logsumexp(scores, dim=-1)  # [Tv, Hq]
            probs = _exp_minus(scores, seg_lse[..., None])  # [Tv, Hq, Ls]
            seg_out = torch.einsum("thk,khd->thd", probs, values)  # [Tv, Hq, Dv]
            out_v, lse_v = _merge(out_v, lse_v, seg_out, seg_lse)
        out[rows], lse[rows] = out_v, lse_v
    result = out.to(query.dtype)  # [T, Hq, Dv]
    return (result, lse) if return_lse else result


@dataclass(frozen=True)
class DenseView:
    """One view gathered from the paged cache in segment order (which is view order). L = sum of segment lengths."""

    keys: torch.Tensor  # [L, Hkv, D] cache dtype, rotated at natural positions
    values: torch.Tensor  # [L, Hkv, Dv] cache dtype
    natural_pos: torch.Tensor  # [L] int64, index of each key in its sequence
    view_pos: torch.Tensor  # [L] int64


def materialize_views_reference(key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_tables: torch.Tensor, table: SegmentTable) -> list[DenseView]:
    """Every view of the table as dense tensors (see DenseView), in view index order. Reads only.

    key_cache: [num_blocks, block_size, Hkv, D]; value_cache: [num_blocks, block_size, Hkv, Dv];
    block_tables: [num_seqs, max_blocks] int32.
    """
    check_table_values(table, block_tables, key_cache.shape[1])
    device = key_cache.device
    views = []
    for view in range(table.num_views):
        keys = [key_cache.new_empty(0, *key_cache.shape[2:])]  # [0, Hkv, D], so empty views concatenate
        values = [value_cache.new_empty(0, *value_cache.shape[2:])]  # [0, Hkv, Dv]
        natural = [torch.zeros(0, dtype=torch.int64, device=device)]  # [0]
        view_pos = [torch.zeros(0, dtype=torch.int64, device=device)]  # [0]
        for seq, start, length, view_start in table.view_segments(view):
            keys.append(_gather_tokens(key_cache, block_tables[seq], start, length))  # [Ls, Hkv, D]
            values.append(_gather_tokens(value_cache, block_tables[seq], start, length))  # [Ls, Hkv, Dv]
            natural.append(torch.arange(start, start + length, device=device))  # [Ls]
            view_pos.append(torch.arange(view_start, view_start + length, device=device))  # [Ls]
        views.append(DenseView(torch.cat(keys), torch.cat(values), torch.cat(natural), torch.cat(view_pos)))
    return views


def dense_view_attention_reference(query: torch.Tensor, n_q: torch.Tensor, p_q: torch.Tensor,
                                   keys: torch.Tensor, values: torch.Tensor, key_natural_pos: torch.Tensor,
                                   key_view_pos: torch.Tensor, rope: DeltaRotation,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: plain causal softmax attention over one dense view, every token re-rotated to its view position.

    query: [Tq, Hq, D] rotated at n_q [Tq], at view positions p_q [Tq]; keys: [L, Hkv, D] rotated at
    key_natural_pos [L], at view positions key_view_pos [L]; values: [L, Hkv, Dv]. Key j is visible to query i iff
    key_view_pos[j] <= p_q[i]; query head h reads KV head h // (Hq // Hkv).
    Returns out [Tq, Hq, Dv] fp32 and lse [Tq, Hq] fp32; a query with no visible key gets zeros and lse = -inf.
    """
    group = query.shape[1] // keys.shape[1]
    q = rope.rotate(query.float(), (p_q - n_q).long())  # [Tq, Hq, D] rotated at p_q
    k = rope.rotate(keys.float(), (key_view_pos - key_natural_pos).long())  # [L, Hkv, D] rotated at view positions
    k = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = values.float().repeat_interleave(group, dim=1)  # [L, Hq, Dv]
    scores = torch.einsum("qhd,khd->qhk", q, k) * scale  # [Tq, Hq, L]
    visible = key_view_pos[None, :] <= p_q[:, None]  # [Tq, L]
    scores = scores.masked_fill(~visible[:, None, :], NEG_INF)  # [Tq, Hq, L]
    lse = torch.logsumexp(scores, dim=-1)  # [Tq, Hq]
    probs = torch.softmax(scores, dim=-1)  # [Tq, Hq, L], NaN rows where nothing is visible
    probs = torch.where(visible.any(dim=1)[:, None, None], probs, 0.0)  # [Tq, Hq, L]
    out = torch.einsum("qhk,khd->qhd", probs, v)  # [Tq, Hq, Dv]
    return out, lse
