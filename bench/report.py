"""Markdown summary of a pytest-benchmark JSON from bench/: per group, each implementation's best time,
its % of the copy limit measured in the same run and its speed-up over the eager loop (linear ops), or
its time relative to fused task arithmetic and its peak extra memory (DARE/TIES), its time per step
and speed-up over the reference (OPCM), or wall time and peak RSS against mergekit (end to end).

    python bench/report.py bench/results/NAME.json > bench/results/NAME.md
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    info = data["machine_info"]
    device = info.get("device") or info.get("cpu", {}).get("brand_raw", "?")
    print(f"# {path}\n\ndevice: {device} ({info.get('cores')} cores, {info.get('memory_gb')} GB), "
          f"torch {info.get('torch')}, {data['datetime']}\n")
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b
    if all(b["extra_info"].get("per") == "step" for b in data["benchmarks"]):
        return _per_step(groups)
    if all(b["extra_info"].get("per") == "e2e" for b in data["benchmarks"]):
        return _end_to_end(groups)
    if all(b["params"]["impl"] in PEERS + ("fusedmerge",) for b in data["benchmarks"]):
        return _versus_peer(groups)
    sparse = any("peak_extra_mb" in b["extra_info"] for b in data["benchmarks"])
    if sparse:
        print("| group | implementation | best ms | × fused task arithmetic | peak extra memory MB |")
    else:
        print("| group | implementation | best ms | % of copy limit | × faster than eager loop |")
    print("|---|---|---:|---:|---:|")
    for group, impls in groups.items():
        copy = impls.get("copy")
        eager = impls.get("fusionbench_loop") or impls.get("eager")
        fused_ta = impls.get("fused_task_arithmetic")
        for name, b in sorted(impls.items(), key=lambda kv: kv[1]["stats"]["min"]):
            t = b["stats"]["min"]
            if sparse:
                ratio = f"{t / fused_ta['stats']['min']:.2f}×" if fused_ta else ""
                print(f"| {group} | {name} | {t * 1e3:.1f} | {ratio} | {b['extra_info']['peak_extra_mb']} |")
                continue
            pct = f"{100 * copy['stats']['min'] / t:.0f}%" if copy else ""
            speed = f"{eager['stats']['min'] / t:.1f}×" if eager else ""
            print(f"| {group} | {name} | {t * 1e3:.1f} | {pct} | {speed} |")


def _per_step(groups) -> None:
    print("| group | implementation | steps timed | best s/step | mean s/step | × faster than reference | peak extra MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for group, impls in groups.items():
        ref = impls.get("reference")
        for name, b in sorted(impls.items(), key=lambda kv: kv[1]["stats"]["mean"]):
            st = b["stats"]
            speed = f"{ref['stats']['mean'] / st['mean']:.1f}×" if ref else ""
            print(f"| {group} | {name} | {st['rounds']} | {st['min']:.2f} | {st['mean']:.2f} | {speed} | "
                  f"{b['extra_info']['peak_extra_mb']} |")


PEERS = ("fusion_bench", "mergekit")


def _versus_peer(groups) -> None:
    print("| group | implementation | best s | × faster than the peer | peak extra MB |")
    print("|---|---|---:|---:|---:|")
    for group, impls in groups.items():
        peer = next((impls[p] for p in PEERS if p in impls), None)
        for name, b in sorted(impls.items(), key=lambda kv: kv[1]["stats"]["min"]):
            t = b["stats"]["min"]
            speed = f"{peer['stats']['min'] / t:.1f}×" if peer else ""
            print(f"| {group} | {name} | {t:.2f} | {speed} | {b['extra_info']['peak_extra_mb']} |")


def _end_to_end(groups) -> None:
    print("| group | command | wall s | × faster than mergekit | peak RSS MB | share of mergekit's RSS |")
    print("|---|---|---:|---:|---:|---:|")
    for group, impls in groups.items():
        mk = impls.get("mergekit")
        for name, b in sorted(impls.items(), key=lambda kv: kv[1]["extra_info"]["wall_s"]):
            e = b["extra_info"]
            speed = f"{mk['extra_info']['wall_s'] / e['wall_s']:.1f}×" if mk else ""
            share = f"{e['peak_rss_mb'] / mk['extra_info']['peak_rss_mb']:.2f}" if mk else ""
            print(f"| {group} | {name} | {e['wall_s']:.1f} | {speed} | {e['peak_rss_mb']} | {share} |")


if __name__ == "__main__":
    main(sys.argv[1])
