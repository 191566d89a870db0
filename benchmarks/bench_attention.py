"""The hogwild attention op alone on decode-shaped cases, against the torch reference and vLLM's own CPU kernel.

    python benchmarks/bench_attention.py [--keys 1024 4096 16384] [--segments 1 4 16 64] [--threads 1 2]
        [--shapes 64:9:3 128:28:4] [--reference-max-keys 4096] [--out benchmarks/results]

A case: ``--workers`` (4) views, one query token each (decode), every view ``keys`` keys long, cut into ``segments``
equal segments. Each worker's own log is one block-table row of ``keys`` tokens; a view's last segment is the tail
of its own row (delta 0, the query is its last key), the others come from the other rows at shuffled starts, so
every segment but the last has a nonzero position delta. The bf16 cache is vLLM's CPU layout (``kv_cache
[num_blocks, Hkv, block_size, 2 * D]``, block 128, shuffled block ids) in the packing vLLM's backend picks on this
machine (``amx`` on CPUs with AMX tiles, else ``vec``), written with vLLM's own ``cpu_attn_reshape_and_cache``; the
hogwild ops read it as the plugin's backend does: ``vec`` through strided ``[num_blocks, block_size, Hkv, D]`` views
(``ops.layouts.cpu_page_views``: K dim-major inside a page, V row-major), ``amx`` as pages with ``packing="amx"``
(``ops.layouts.amx_pages``); the layout is checked against the written keys and values before timing.

Columns: ``ext`` (``hogwild_attention(..., impl="ext")``, the compiled op; skipped with a note until it is built),
``ext_vectors`` (the same op with ``HOGWILD_CPU_AMX_TILES=0``: fp32 vector products instead of AMX tiles; only where
the op uses tiles, i.e. ``amx`` pages on a CPU with AMX-BF16),
``reference`` (``impl="reference"``, pure torch, only up to --reference-max-keys: it is slow), ``vllm``
(``cpu_attention_with_kv_cache`` over ONE segment of the same keys per sequence: plain causal decode of ``workers``
sequences; its scheduler metadata is built outside the timing, as vLLM builds it once per step), ratios
(reference / ext = speedup; ext / vllm) and max |difference| of ext against the reference (and, at one segment,
against vLLM, which then computes the same attention). Times: medians after two warm-up calls, ext and vLLM timed
in interleaved rounds (a load change on the shared machine hits both), per thread count (``torch.set_num_threads``;
vLLM's worker uses one OpenMP thread on a 2-core machine). Writes ``<name>.csv`` / ``.md`` / ``.png`` under --out.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _report import describe, fmt, line_panels, machine_info, print_table, write_results

from hogwild_vllm.ops import SegmentTable, amx_tiles_switched_off, cpu_amx_tiles, hogwild_attention
from hogwild_vllm.ops.layouts import amx_pages, amx_unpacked, cpu_page_views
from hogwild_vllm.rope import DeltaRope, RopeSpec

HERE = Path(__file__).resolve().parent
COLUMNS = ["shape", "threads", "keys", "segments", "ext_ms", "ext_vectors_ms", "reference_ms", "vllm_ms",
           "ref_over_ext", "ext_over_vllm", "vectors_over_vllm", "diff_ext_ref", "diff_vs_vllm"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[1024, 4096, 16384], help="keys per view")
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 4, 16, 64], help="segments per view")
    ap.add_argument("--workers", type=int, default=4, help="views (one decode query each)")
    ap.add_argument("--shapes", nargs="+", default=["64:9:3"], help="head_dim:query_heads:kv_heads (also 128:28:4)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--reference-max-keys", type=int, default=4096, help="run the reference up to this many keys")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement (at least)")
    ap.add_argument("--max-repeats", type=int, default=200, help="at most this many timed rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="bench_attention")
    return ap.parse_args()


def median_seconds(fns: dict[str, Callable[[], Any]], min_time: float, max_repeats: int) -> dict[str, float]:
    """Median wall time of each function, timed in interleaved rounds (one call of each per round, so a change in
    the machine's load hits all alike) after two warm-up calls each: at least 3 rounds, then until every function
    has ``min_time`` seconds of calls or ``max_repeats`` rounds ran."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds = len(times[next(iter(fns))])
        if rounds >= 3 and (rounds >= max_repeats or all(sum(t) >= min_time for t in times.values())):
            return {name: statistics.median(t) for name, t in times.items()}


def ext_missing() -> str | None:
    """Why the compiled attention op cannot run (None when it can)."""
    try:
        from hogwild_vllm.ops._ext import load_ops

        ops = load_ops()
    except ImportError as e:
        return f"compiled extension missing ({e})"
    if not hasattr(ops, "hogwild_attention"):
        return "torch.ops.hogwild_C.hogwild_attention is not built yet"
    return None


class PagedCase:
    """``workers`` rows of ``keys`` tokens each in one vLLM-layout bf16 cache (fixed per shape and key count)."""

    def __init__(self, head_dim: int, q_heads: int, kv_heads: int, keys: int, workers: int, block_size: int,
                 gen: torch.Generator) -> None:
        from vllm import _custom_ops as ops

        self.d, self.hq, self.hkv, self.keys = head_dim, q_heads, kv_heads, keys
        self.workers, self.bs = workers, block_size
        per_row = -(-keys // block_size)
        nb = workers * per_row + 1
        self.kv = torch.zeros(nb, kv_heads, block_size, 2 * head_dim, dtype=torch.bfloat16)  # vLLM's per-layer cache
        self.key_cache, self.value_cache = self.kv.view(nb, kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
        self.packing = "amx" if self.isa() == "amx" else "strided"
        if self.packing == "amx":
            torch.cpu._init_amx()  # this process may use AMX tiles (vLLM's kernel needs them)
        pos = torch.arange(keys)
        self.block_tables = torch.randperm(nb, generator=gen)[: workers * per_row].view(workers, per_row).int()
        slots = (self.block_tables.long()[:, pos // block_size] * block_size + pos % block_size).flatten()  # [W*K]
        key = torch.randn(workers * keys, kv_heads, head_dim, generator=gen).bfloat16()
        value = torch.randn(workers * keys, kv_heads, head_dim, generator=gen).bfloat16()
        ops.cpu_attn_reshape_and_cache(key, value, self.key_cache, self.value_cache, slots, self.isa(),
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        if self.packing == "amx":  # pages [nb, Hkv, bs, D] in vLLM's AMX packing, read by packing="amx"
            self.key_view, self.value_view = amx_pages(self.kv)
            key_read, value_read = amx_unpacked(self.key_view, self.value_view)  # [nb, bs, Hkv, D] copies
        else:  # [nb, bs, Hkv, D] views, as the HOGWILD backend takes them: K (token j, dim d) at d * bs + j inside
            self.key_view, self.value_view = cpu_page_views(self.kv)  # its (block, head) page, V row-major after it
            key_read, value_read = self.key_view, self.value_view
        probe = slots[:: max(1, slots.numel() // 97)]  # the layout reads back what vLLM wrote
        index = torch.arange(0, slots.numel(), max(1, slots.numel() // 97))
        if not (torch.equal(key_read[probe // block_size, probe % block_size], key[index])
                and torch.equal(value_read[probe // block_size, probe % block_size], value[index])):
            raise RuntimeError(f"vLLM's CPU cache packing {self.isa()!r} is not the one this benchmark assumes")
        self.query = torch.randn(workers, q_heads, head_dim, generator=gen).bfloat16()
        self.scale = head_dim ** -0.5
        self.rope = DeltaRope(RopeSpec(head_size=head_dim, rotary_dim=head_dim, max_position=32768, base=1e5,
                                       is_neox_style=True))

    def isa(self) -> str:
        """vLLM's CPU attention ISA for this cache (``amx`` on CPUs with AMX tiles, ``vec`` on AVX-512 / AVX2), as
        its backend picks it."""
        try:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            return _get_attn_isa(torch.bfloat16, self.bs, self.d)
        except Exception:
            return "vec"

    def table(self, segments: int, gen: torch.Generator) -> SegmentTable:
        """Views of ``segments`` equal segments: the last is the own row's tail, the others other rows' pieces."""
        k, w = self.keys, self.workers
        length = k // segments
        rows, offsets = [], [0]
        for v in range(w):
            starts = torch.randperm(segments, generator=gen).tolist()
            for j in range(segments):
                own = j == segments - 1 or w == 1
                seq = v if own else (v + 1 + j % (w - 1)) % w  # another worker's row
                start = k - length if j == segments - 1 else starts[j] * length
                rows.append((seq, start, length, j * length))
            offsets.append(len(rows))
        last = segments * length - 1  # the query: natural position = view position = its own last key
        return SegmentTable(segments=torch.tensor(rows, dtype=torch.int32),
                            view_offsets=torch.tensor(offsets, dtype=torch.int32),
                            query_view=torch.arange(w, dtype=torch.int32),
                            query_pos=torch.tensor([[last, last]] * w, dtype=torch.int32))

    def hogwild(self, table: SegmentTable, impl: str) -> torch.Tensor:
        """One call of ``hogwild_attention`` (``impl`` = ext | ext_vectors | reference) over the cache views;
        ``ext_vectors`` is the compiled op with its AMX tiles switched off for this call."""
        if impl == "ext_vectors":
            with amx_tiles_switched_off():
                return self.hogwild(table, "ext")
        out = hogwild_attention(self.query, self.key_view, self.value_view, self.block_tables, table, self.rope,
                                self.scale, impl=impl, packing=self.packing)
        assert isinstance(out, torch.Tensor)
        return out

    def vllm_call(self) -> tuple[Callable[[], None], torch.Tensor]:
        """vLLM's kernel over one segment of ``keys`` per sequence (metadata built now, for this thread count)."""
        import vllm.envs as envs
        from vllm import _custom_ops as ops

        w = self.workers
        seq_lens = torch.full((w,), self.keys, dtype=torch.int32)
        qsl = torch.arange(w + 1, dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=w, num_heads=self.hq, num_kv_heads=self.hkv, head_dim=self.d, seq_lens=seq_lens,
            dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=self.isa(),
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
        out = torch.empty_like(self.query)

        def call() -> None:
            ops.cpu_attention_with_kv_cache(
                query=self.query, key_cache=self.key_cache, value_cache=self.value_cache, output=out,
                query_start_loc=qsl, seq_lens=seq_lens, scale=self.scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=self.block_tables, softcap=0.0, scheduler_metadata=meta, s_aux=None)

        return call, out


def keys_label(keys: int) -> str:
    """``1k`` for 1024 keys, the plain number when not a multiple of 1024."""
    return f"{keys // 1024}k" if keys % 1024 == 0 else str(keys)


def series_style(label: str, key_counts: list[int]) -> dict[str, Any]:
    """Plot style of a series named ``<impl...> <keys>``: colour by implementation, marker by key count."""
    impl, keys = label.rsplit(" ", 1)
    color = {"ext": "tab:blue", "ext vectors": "tab:green", "reference": "tab:orange"}.get(impl, "tab:gray")
    labels = [keys_label(k) for k in key_counts]
    marker = "osD^v<>p*"[labels.index(keys) % 9] if keys in labels else "x"
    return {"color": color, "marker": marker, "linestyle": "--" if impl.startswith("vLLM") else "-"}


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """max |a - b| in fp32, None when either is missing."""
    return None if a is None or b is None else float((a.float() - b.float()).abs().max())


def measure(case: PagedCase, table: SegmentTable, impls: list[str], vllm_call: Callable[[], None],
            args: argparse.Namespace, errors: list[str]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Times (ms) of the hogwild implementations ``impls`` on one table, ext interleaved with vLLM's kernel and the
    (slow) reference alone, and their outputs; a failing implementation goes to ``errors``, the others still run."""
    times: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    calls: dict[str, Callable[[], Any]] = {impl: functools.partial(case.hogwild, table, impl) for impl in impls}
    paired: dict[str, Callable[[], Any]] = {"vllm": vllm_call}
    paired.update({k: calls[k] for k in ("ext", "ext_vectors") if k in calls})
    groups = [paired] + ([{"reference": calls["reference"]}] if "reference" in calls else [])
    for group in groups:
        try:
            times.update({f"{k}_ms": 1000 * t for k, t in median_seconds(group, args.min_time,
                                                                           args.max_repeats).items()})
            outs.update({k: fn() for k, fn in group.items() if k != "vllm"})
        except Exception as e:  # report the failing case, time the others
            errors.append(f"{'/'.join(group)} D{case.d} keys {case.keys} segments "
                          f"{table.segments.shape[0] // case.workers}: {type(e).__name__}: {e}")
    return times, outs


def main() -> int:
    args = parse_args()
    info = machine_info()
    missing = ext_missing()
    if missing:
        print(f"note: ext column skipped: {missing}")
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    tiles = False
    for shape in args.shapes:
        d, hq, hkv = (int(x) for x in shape.split(":"))
        for keys in args.keys:
            case = PagedCase(d, hq, hkv, keys, args.workers, args.block_size, gen)
            tiles = not missing and case.packing == "amx" and cpu_amx_tiles()
            impls = [i for i, skip in (("ext", missing), ("ext_vectors", not tiles),
                                       ("reference", keys > args.reference_max_keys)) if not skip]
            for threads in args.threads:
                torch.set_num_threads(threads)
                vllm_call, vllm_out = case.vllm_call()
                vllm_call()
                for segments in args.segments:
                    times, outs = measure(case, case.table(segments, gen), impls, vllm_call, args, errors)
                    ext, ref, vllm_ms = times.get("ext_ms"), times.get("reference_ms"), times.get("vllm_ms")
                    vectors = times.get("ext_vectors_ms")
                    row: dict[str, Any] = {
                        "shape": f"D{d} H{hq}/{hkv}", "threads": threads, "keys": keys, "segments": segments,
                        "ext_ms": ext, "ext_vectors_ms": vectors, "reference_ms": ref, "vllm_ms": vllm_ms,
                        "ref_over_ext": ref / ext if ext and ref else None,
                        "ext_over_vllm": ext / vllm_ms if ext and vllm_ms else None,
                        "vectors_over_vllm": vectors / vllm_ms if vectors and vllm_ms else None,
                        "diff_ext_ref": max_diff(outs.get("ext"), outs.get("reference")),
                        "diff_vs_vllm": max_diff(outs.get("ext", outs.get("reference")), vllm_out) if segments == 1
                        else None}
                    rows.append(row)
                    print(f"  {row['shape']} threads {threads} keys {keys} segments {segments}: ext {fmt(ext)} ms, "
                          f"ext vectors {fmt(vectors)} ms, reference {fmt(ref)} ms, vllm {fmt(vllm_ms)} ms", flush=True)
    header = [f"command: {shlex.join(['python', *sys.argv])}", f"machine: {describe(info)}",
              f"bf16 cache, vLLM CPU layout, block {args.block_size}, packing {case.isa()}; {args.workers} views, one "
              f"decode query each; times: medians of >= 3 calls, >= {args.min_time} s or {args.max_repeats} calls, "
              "after 2 warm-up calls; ext and vllm interleaved",
              "ext: " + (f"skipped ({missing})" if missing else "hogwild_attention(impl='ext')"
                         + (", bf16 products on AMX tiles; ext_vectors: the same with HOGWILD_CPU_AMX_TILES=0"
                            if tiles else ", fp32 vector products")),
              f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}"] + [f"error: {e}" for e in errors]
    print("\n".join(header))
    markdown = print_table(rows, COLUMNS)
    out = write_results(rows, args.out, args.name, header, markdown)
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for r in rows:
        series = panels.setdefault(f"{r['shape']}, {r['threads']} thread(s)", {})
        for impl, label in (("ext", "ext"), ("ext_vectors", "ext vectors"), ("reference", "reference"),
                            ("vllm", "vLLM 1 segment")):
            if r.get(f"{impl}_ms"):
                xs, ys = series.setdefault(f"{label} {keys_label(r['keys'])}", ([], []))
                xs.append(r["segments"])
                ys.append(r[f"{impl}_ms"])
    line_panels(panels, out / f"{args.name}.png", "segments per view", "ms per call", describe(info), logy=True,
                style=functools.partial(series_style, key_counts=args.keys))
    print(f"results: {out / args.name}.csv / .md / .png")
    for e in errors:
        print(f"error: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
