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


def _table(groups, header, sort_key, ref_name, cells) -> None:
    """One markdown row per implementation, sorted by `sort_key`; `cells(bench, ref)` gives the row after
    the group and name, `ref` being the group's `ref_name` benchmark (or None)."""
    print("| group | implementation | " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * len(header))
    for group, impls in groups.items():
        ref = next((impls[r] for r in ref_name if r in impls), None)
        for name, b in sorted(impls.items(), key=lambda kv: sort_key(kv[1])):
            print(f"| {group} | {name} | " + " | ".join(cells(b, ref)) + " |")


def _per_step(groups) -> None:
    _table(groups, ["steps timed", "best s/step", "mean s/step", "× faster than reference", "peak extra MB"],
           lambda b: b["stats"]["mean"], ("reference", "fusionbench"),
           lambda b, ref: [str(b["stats"]["rounds"]), f"{b['stats']['min']:.2f}", f"{b['stats']['mean']:.2f}",
                           f"{ref['stats']['mean'] / b['stats']['mean']:.1f}×" if ref else "",
                           str(b["extra_info"]["peak_extra_mb"])])


PEERS = ("fusion_bench", "mergekit")


def _versus_peer(groups) -> None:
    _table(groups, ["best s", "× faster than the peer", "peak extra MB"], lambda b: b["stats"]["min"], PEERS,
           lambda b, ref: [f"{b['stats']['min']:.2f}", f"{ref['stats']['min'] / b['stats']['min']:.1f}×" if ref else "",
                           str(b["extra_info"]["peak_extra_mb"])])


def _end_to_end(groups) -> None:
    wall = lambda b: b["extra_info"]["wall_s"]  # noqa: E731
    rss = lambda b: b["extra_info"]["peak_rss_mb"]  # noqa: E731
    _table(groups, ["wall s", "× faster than mergekit", "peak RSS MB", "share of mergekit's RSS"], wall, ("mergekit",),
           lambda b, ref: [f"{wall(b):.1f}", f"{wall(ref) / wall(b):.1f}×" if ref else "", str(rss(b)),
                           f"{rss(b) / rss(ref):.2f}" if ref else ""])


if __name__ == "__main__":
    main(sys.argv[1])
