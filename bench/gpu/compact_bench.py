"""Compact benchmark for one device check: average, task arithmetic, DARE and TIES on CLIP ViT state dicts
(base + N fine-tuned, fusedmerge.synthetic), every backend that runs on the device's tensors plus the torch
reference. Per row: best and median time, bytes moved (fusedmerge.perf.merge_bytes), % of a plain copy of as
many bytes timed in the same run (fusedmerge.perf.CopyLimit), and whether the result equals the torch
reference bit for bit. Writes JSON and a markdown table after every configuration, so a run stopped by a
time limit still leaves what it measured.

    python bench/gpu/compact_bench.py --device cuda --json OUT.json --md OUT.md     # the GPU check
    python bench/gpu/compact_bench.py --device cpu --quick --json OUT.json --md OUT.md   # dry run, tiny sizes
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

DTYPE_NAMES = ("bf16", "fp32", "fp16")
OPS = ("average", "task_arithmetic", "dare", "ties")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny model, N = 2, 1 repeat: a dry run of the code paths")
    p.add_argument("--models", default=None, help="comma-separated CLIP ViT configs (default B/32,L/14; --quick: tiny)")
    p.add_argument("--n", type=int, default=None, help="fine-tuned models per merge (default 8; --quick: 2)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--repeat", type=int, default=None, help="timed calls per fused backend (default 10; --quick: 1)")
    p.add_argument("--ref-repeat", type=int, default=None, help="timed calls of the torch reference (default 1)")
    p.add_argument("--budget", type=float, default=0, help="seconds; configurations past it are skipped (0: none)")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    a.models = (a.models or ("tiny" if a.quick else "B/32,L/14")).split(",")
    a.n = a.n or (2 if a.quick else 8)
    a.repeat = a.repeat or (1 if a.quick else 10)
    a.ref_repeat = a.ref_repeat or 1
    a.dtypes, a.ops = a.dtypes.split(","), a.ops.split(",")
    bad = [d for d in a.dtypes if d not in DTYPE_NAMES] + [o for o in a.ops if o not in OPS]
    if bad:
        p.error(f"unknown dtypes/ops {bad}; dtypes {DTYPE_NAMES}, ops {OPS}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"compact_bench: --device cuda, but torch {torch.__version__} sees no GPU")
    if device.type == "cpu":  # the Triton kernels run on CPU tensors only under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fusedmerge
    from fusedmerge.perf import cpu_name

    status = fusedmerge.backends()
    backends = ["torch"] + [n for n in ("cuda", "triton", "cpu") if status[n].available and device.type in status[n].devices]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type, "quick": args.quick, "n": args.n,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host_cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": _version("triton"), "fusedmerge_file": fusedmerge.__file__,
        "backends": {n: s.reason for n, s in status.items()},
        "params": {"task_arithmetic": "scaling 0.3", "dare": "p 0.9, scaling 1/N, seed 0",
                   "ties": "density 0.2, scaling 0.3, scope tensor"},
        "copy": [], "rows": [], "skipped": [],
    }
    start = time.perf_counter()
    for model in args.models:
        if args.budget and time.perf_counter() - start > args.budget:
            report["skipped"] += [f"{model} {d}: past the {args.budget:.0f} s budget" for d in args.dtypes]
            continue
        t0 = time.perf_counter()
        base32, models32 = build_models(model, args.n, device)
        print(f"# {model}: {args.n} + 1 state dicts on {device} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for dname in args.dtypes:
            if args.budget and time.perf_counter() - start > args.budget:
                report["skipped"].append(f"{model} {dname}: past the {args.budget:.0f} s budget")
                continue
            bench_config(report, args, device, backends, model, dname, base32, models32)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(report, args)
        del base32, models32
    report["seconds"] = time.perf_counter() - start
    write(report, args)
    print(markdown(report))
    failed = [r for r in report["rows"] if r.get("bit_equal") is False]
    unexpected = [r for r in report["rows"] if "error" in r and not (r["backend"] == "cuda" and r["op"] == "ties")]
    for r in failed + unexpected:
        print(f"FAILED: {r['model']} {r['dtype']} {r['op']} {r['backend']}: {r.get('error', 'differs from torch')}",
              file=sys.stderr)
    return 1 if failed or unexpected or not report["rows"] else 0


def bench_config(report, args, device, backends, model, dname, base32, models32) -> None:
    """One (model, dtype): per op, the copy limit of its byte count (once per count), then the torch
    reference (its first result is the reference) and each fused backend, rows appended to the report."""
    import torch

    import fusedmerge
    from fusedmerge.perf import CopyLimit, merge_bytes, same_bits

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dname]
    base = {k: v.to(dtype) for k, v in base32.items()}
    models = [{k: v.to(dtype) for k, v in m.items()} for m in models32]
    ops = {
        "average": lambda b: fusedmerge.average(models, backend=b),
        "task_arithmetic": lambda b: fusedmerge.task_arithmetic(base, models, 0.3, backend=b),
        "dare": lambda b: fusedmerge.dare(base, models, 0.9, scaling=1 / len(models), seed=0, backend=b),
        "ties": lambda b: fusedmerge.ties(base, models, density=0.2, scaling=0.3, backend=b),
    }
    copies = {}  # bytes -> best copy seconds
    for op in args.ops:
        nbytes = merge_bytes(models) if op == "average" else merge_bytes([base, *models])
        if nbytes not in copies:
            copies[nbytes] = min(timed(CopyLimit(nbytes, device), args.repeat, device)[0])
            report["copy"].append({"model": model, "dtype": dname, "bytes": nbytes, "best_ms": 1e3 * copies[nbytes],
                                   "gbps": nbytes / copies[nbytes] / 1e9})
        ref = None
        for backend in backends:  # torch first: the reference
            row = {"model": model, "dtype": dname, "n": args.n, "op": op, "backend": backend, "bytes": nbytes}
            report["rows"].append(row)
            try:
                ts, out = timed(lambda: ops[op](backend), args.ref_repeat if backend == "torch" else args.repeat, device)
            except Exception as e:  # a backend without this op (cuda TIES) or a failure: recorded, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            row.update(best_ms=1e3 * min(ts), median_ms=1e3 * statistics.median(ts), gbps=nbytes / min(ts) / 1e9,
                       copy_ms=1e3 * copies[nbytes], pct_of_copy=100 * copies[nbytes] / min(ts))
            if backend == "torch":
                ref = out
            row["bit_equal"] = ref is not None and all(same_bits(out[k], ref[k]) for k in ref)


def timed(fn, repeat, device):
    """Seconds of `repeat` synchronised calls after one warm-up call, and the warm-up call's result."""
    from fusedmerge.perf import sync

    result = fn()
    sync(device)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return ts, result


def build_models(model, n, device):
    """clip_vit_models(model, n, seed=0) (the same calls, so the same values), moved to `device`; the
    fine-tuned variants are drawn in threads (torch's CPU generator releases the GIL): the serial draw of
    L/14 takes minutes on one core."""
    from concurrent.futures import ThreadPoolExecutor

    from fusedmerge.synthetic import clip_vit_base, clip_vit_finetuned

    base = clip_vit_base(model, seed=0)

    def variant(i):
        return {k: v.to(device) for k, v in clip_vit_finetuned(base, i, seed=0).items()}

    with ThreadPoolExecutor(max(1, min(n, os.cpu_count() or 1))) as pool:
        models = list(pool.map(variant, range(n)))
    return {k: v.to(device) for k, v in base.items()}, models


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def markdown(report) -> str:
    lines = [f"# fusedmerge compact benchmark: {report['device']}", "",
             f"{report['date']}; torch {report['torch']} (CUDA {report['torch_cuda']}), triton {report['triton']}, "
             f"python {report['python']}, {report['host_cores']} host cores; N = {report['n']}"
             + (" (--quick: tiny sizes)" if report["quick"] else ""), "",
             "Backends: " + "; ".join(f"{n}: {r}" for n, r in report["backends"].items()), "",
             "Copy limit (a device copy of as many bytes, read + written, best of the run):", "",
             "| model | dtype | MB | best ms | GB/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {c['model']} | {c['dtype']} | {c['bytes'] / 1e6:.1f} | {c['best_ms']:.3f} | {c['gbps']:.0f} |"
              for c in report["copy"]]
    lines += ["", "| model | dtype | op | backend | best ms | median ms | MB | GB/s | % of copy limit | bits = torch |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        head = f"| {r['model']} | {r['dtype']} | {r['op']} | {r['backend']} |"
        if "error" in r:
            lines.append(f"{head} — | — | {r['bytes'] / 1e6:.1f} | — | — | {r['error'][:80]} |")
        else:
            lines.append(f"{head} {r['best_ms']:.3f} | {r['median_ms']:.3f} | {r['bytes'] / 1e6:.1f} | {r['gbps']:.0f} "
                         f"| {r['pct_of_copy']:.0f} % | {'yes' if r['bit_equal'] else '**NO**'} |")
    if report["skipped"]:
        lines.append("\nSkipped: " + "; ".join(report["skipped"]))
    if "seconds" in report:
        lines.append(f"\nBenchmark wall time: {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def write(report, args) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
