#!/usr/bin/env python3
"""GPU check of the Hogwild! ops: build the extension, run the op tests on CUDA, time the Triton kernel.

    python3 scripts/gpu_check.py                        (make gpu-check) on a machine with a CUDA GPU
    python3 scripts/gpu_check.py --device cpu --quick   the same logic on CPU: no build, interpreter, tiny sizes

Installs nothing and imports nothing from vLLM (needs torch, triton, pytest; nvcc for the build). Steps:
  1. environment, and that the ops and the test cases import with vLLM blocked (child process);
  2. ``setup.py build_ext --inplace`` with TORCH_CUDA_ARCH_LIST (default 9.0), in the background during step 3;
     a failed build is reported and the rest goes on;
  3. pytest: tests/test_triton_attention.py (its cuda cases, without TRITON_INTERPRET), then tests/test_csrc_ops.py
     once the build is done; every child has a time limit;
  4. timings (scripts/gpu_bench.py): Triton eager and replayed from a CUDA graph, torch SDPA per backend, and the
     bandwidth of a device copy; a table on stdout and CSV in $OUT (when set) or results/.
Ends with a PASS / FAIL summary; exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

import gpu_bench  # noqa: E402
import torch  # noqa: E402

BLOCK_VLLM = """
import importlib.abc, sys
class _BlockVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(name + " is blocked by gpu_check")
        return None
sys.meta_path.insert(0, _BlockVllm())
sys.modules["vllm"] = None
"""
IMPORT_CHECK = BLOCK_VLLM + """
sys.path[:0] = [ROOT, ROOT + "/tests"]
import attention_cases, hogwild_vllm.ops, hogwild_vllm.ops.reference, hogwild_vllm.ops.segments
import hogwild_vllm.ops.triton_attention
print("imports without vLLM: ok")
"""
COLUMNS = ["workers", "keys", "layout", "impl", "splits", "eager_us", "graph_us", "read_GBps", "stored_GBps",
           "pct_of_copy", "max_err", "ok", "note"]
results: list[tuple[str, str, str]] = []  # (step, PASS | FAIL | SKIP, detail)


def header(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * max(0, 100 - len(title))}", flush=True)


def record(step: str, status: str, detail: str = "") -> None:
    results.append((step, status, detail))
    print(f"[{status}] {step}{': ' + detail if detail else ''}", flush=True)


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own process group, stdout and stderr to log."""
    handle = log.open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(step: str, proc: subprocess.Popen, log: Path, timeout: float, tail: int = 25) -> bool:
    """Waits for a child started by start(); kills its group past timeout. Prints the log tail, records the step."""
    try:
        code = proc.wait(timeout=max(1.0, timeout))
        detail = f"exit {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code, detail = -1, f"timed out after {timeout:.0f} s"
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(f"    | {line}" for line in lines[-tail:]), flush=True)
    record(step, "PASS" if code == 0 else "FAIL", f"{detail} (log: {log})")
    return code == 0


def run_step(step: str, cmd: list[str], log: Path, timeout: float) -> bool:
    return finish(step, start(cmd, log), log, timeout)


def environment(device: str, logs: Path) -> bool:
    header("1. environment")
    import triton  # type: ignore[import-untyped]

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton.__version__}")
    if device == "cuda":
        if not torch.cuda.is_available():
            record("CUDA device", "FAIL", "torch.cuda.is_available() is False")
            return False
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if Path(nvcc).exists():
        version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip()
        print(f"nvcc: {nvcc}: {version.splitlines()[-1] if version else '?'}")
    code = f"ROOT = {str(ROOT)!r}\n" + IMPORT_CHECK
    return run_step("imports without vLLM", [sys.executable, "-c", code], logs / "gpu_check_imports.log", 120)


def pytest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def bench(device: str, quick: bool, deadline: float, out_dir: Path) -> bool:
    header("4. timings (median; bandwidth = K/V bytes read per second)")
    if device == "cuda":
        shapes = [gpu_bench.Shape(w, k) for w in (4, 8) for k in (4096, 16384, 32768)]
        warmup, reps, copy_bytes = 3, 20, 2**30
    else:  # tiny: the interpreter runs about a million elementwise ops per second
        shapes = [gpu_bench.Shape(2, 256, heads=4, kv_heads=2, head_size=64)][: 1 if quick else None]
        warmup, reps, copy_bytes = 1, 2, 2**26
    copy = gpu_bench.copy_bandwidth(device, copy_bytes, warmup, reps)
    print(f"device copy (torch.empty_like(x).copy_(x), {copy_bytes / 2**20:.0f} MiB): {copy / 1e9:.1f} GB/s "
          "read + written")
    rows: list[dict[str, object]] = []
    ok, skipped = True, 0
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        if time.monotonic() > deadline:
            skipped += 1
            continue
        per_view = shape.keys * shape.kv_heads * 2 * shape.head_size * shape.dtype.itemsize  # K + V bytes
        row = functools.partial(_row, shape, shape.workers * per_view, copy)
        for layout in ("shared", "private"):
            batch = gpu_bench.make_batch(shape, layout, device, gen)
            stored = batch.stored_tokens * per_view // shape.keys
            for splits, impl in ((None, "triton"), (1, "triton-1split")):
                try:
                    res = gpu_bench.bench_triton(batch, shape, device, splits, warmup, reps)
                    ok &= bool(res["ok"])
                    rows.append(row(layout, impl, float(res["eager_s"]), float(res["graph_s"]), stored,
                                    splits=res["splits"], max_err=res["max_err"], ok=res["ok"]))
                except Exception as error:  # reported in the table and as a failure
                    ok = False
                    rows.append(row(layout, impl, None, None, stored, ok=False, note=repr(error)[:100]))
            del batch
        for backend, eager, graph, note in gpu_bench.bench_sdpa(shape, device, gen, warmup, reps):
            rows.append(row("contiguous", f"sdpa-{backend}", eager, graph, shape.workers * per_view, note=note))
    ok &= _tune(device, quick, deadline, copy, rows, gen, warmup, reps)
    _print_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_check_bench_{device}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: _fmt(r.get(k)) for k in COLUMNS} for r in rows])
    print(f"CSV: {path}")
    detail = f"{len(shapes) - skipped} of {len(shapes)} shapes" + (" (time budget)" if skipped else "")
    record("timings", "PASS" if ok else "FAIL", detail + ("" if ok else "; a Triton case failed (see table)"))
    return ok


# (num_splits, block_n, num_warps, num_stages) tried on one shape; None = the default split count
TUNING = [(None, 32, 4, 2), (None, 64, 4, 2), (None, 64, 8, 2), (None, 64, 4, 3), (None, 128, 8, 2),
          (4, 64, 4, 2), (18, 64, 4, 2)]


def _tune(device: str, quick: bool, deadline: float, copy: float, rows: list[dict[str, object]],
          gen: torch.Generator, warmup: int, reps: int) -> bool:
    """Launch options of the Triton kernel on the largest shared case (one option set on CPU); rows appended."""
    if device == "cuda":
        shape, configs = gpu_bench.Shape(8, 32768), TUNING
    else:
        shape, configs = gpu_bench.Shape(2, 256, heads=4, kv_heads=2, head_size=64), TUNING[:1]
    per_view = shape.keys * shape.kv_heads * 2 * shape.head_size * shape.dtype.itemsize
    batch = gpu_bench.make_batch(shape, "shared", device, gen)
    ok = True
    for splits, block_n, warps, stages in configs:
        if time.monotonic() > deadline:
            break
        impl = f"tune-bn{block_n}-w{warps}-st{stages}"
        try:
            res = gpu_bench.bench_triton(batch, shape, device, splits, warmup, reps, block_n=block_n,
                                         num_warps=warps, num_stages=stages)
            ok &= bool(res["ok"])
            rows.append(_row(shape, shape.workers * per_view, copy, "shared", impl, float(res["eager_s"]),
                             float(res["graph_s"]), batch.stored_tokens * per_view // shape.keys,
                             splits=res["splits"], max_err=res["max_err"], ok=res["ok"]))
        except Exception as error:  # reported in the table and as a failure
            ok = False
            rows.append(_row(shape, 0, copy, "shared", impl, None, None, 0, ok=False, note=repr(error)[:100]))
    return ok


def _row(shape: gpu_bench.Shape, read: int, copy: float, layout: str, impl: str, eager: float | None,
         graph: float | None, stored: int, **extra: object) -> dict[str, object]:
    """One table row; bandwidths from the graph replay time where there is one, else the eager time."""
    best = graph if graph is not None and not math.isnan(graph) else eager
    fields = {"workers": shape.workers, "keys": shape.keys, "layout": layout, "impl": impl,
              "eager_us": eager and eager * 1e6, "graph_us": graph and graph * 1e6,
              "read_GBps": best and read / best / 1e9, "stored_GBps": best and stored / best / 1e9,
              "pct_of_copy": best and 100 * read / best / copy}
    return {**fields, **extra}


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _print_table(rows: list[dict[str, object]]) -> None:
    shown = COLUMNS[:-1]
    cells = [[_fmt(r.get(k)) for k in shown] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) if cells else len(k) for i, k in enumerate(shown)]
    print("  ".join(k.rjust(w) for k, w in zip(shown, widths, strict=True)))
    for r, c in zip(rows, cells, strict=True):
        note = f"  {r['note']}" if r.get("note") else ""
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)) + note)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewest tests and cases (the CPU dry run)")
    parser.add_argument("--arch", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), help="TORCH_CUDA_ARCH_LIST")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall time limit; later steps are cut")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "results"))
    args = parser.parse_args()
    began = time.monotonic()
    deadline = began + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    left = lambda share: max(30.0, min(share, deadline - time.monotonic()))  # noqa: E731
    if environment(args.device, args.out):
        build = build_log = None
        header("2. build (in the background during the Triton tests)")
        if args.device == "cuda":
            build_log = args.out / "gpu_check_build.log"
            env = {**child_env(), "TORCH_CUDA_ARCH_LIST": args.arch}
            build = start([sys.executable, "setup.py", "build_ext", "--inplace"], build_log, env)
            print(f"started: setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST={args.arch}", flush=True)
        else:
            record("build", "SKIP", "--device cpu: the Triton kernels need no build")
        header(f"3. op tests on {args.device}")
        if args.device == "cuda":
            selection = ["-k", "cuda"]
        else:
            selection = ["-k", "test_query_without_visible_key_gets_zeros and cpu"] if args.quick else ["-k", "cpu"]
        run_step("tests/test_triton_attention.py", pytest_cmd("tests/test_triton_attention.py", *selection),
                 args.out / "gpu_check_pytest_triton.log", left(240))
        if build is not None and build_log is not None:
            header("2. build (result)")
            built = finish("build_ext --inplace", build, build_log, left(300), tail=15)
            header(f"3. op tests on {args.device} (compiled extension)")
            if built:
                run_step("tests/test_csrc_ops.py", pytest_cmd("tests/test_csrc_ops.py"),
                         args.out / "gpu_check_pytest_csrc.log", left(120))
            else:
                record("tests/test_csrc_ops.py", "SKIP", "the extension did not build")
        elif not args.quick:
            run_step("tests/test_csrc_ops.py", pytest_cmd("tests/test_csrc_ops.py"),
                     args.out / "gpu_check_pytest_csrc.log", left(120))
        bench(args.device, args.quick, deadline, args.out)
    header(f"summary ({time.monotonic() - began:.0f} s)")
    for step, status, detail in results:
        print(f"  {status:4}  {step}{': ' + detail if detail else ''}")
    failed = [step for step, status, _ in results if status == "FAIL"]
    print("FAIL: " + ", ".join(failed) if failed else "PASS", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
