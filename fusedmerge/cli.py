"""Command line: ``fusedmerge merge CONFIG.yml OUT_DIR`` merges model directories as a mergekit-style
configuration says, streaming with bounded memory (and across processes under torchrun);
``fusedmerge demo`` merges synthetic CLIP ViT checkpoints with every backend present and reports time, %
of the measured bandwidth limit and the difference from the reference; ``fusedmerge backends`` lists the
backends and why any is missing."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import average, backends, task_arithmetic
from .perf import CopyLimit, best_time, merge_bytes
from .synthetic import CLIP_VIT, clip_vit_models

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _max_diff(got, want) -> float:
    return max(((got[k].double() - want[k].double()).abs().max().item() if want[k].numel() else 0.0) for k in want)


def _bit_equal(got, want) -> bool:
    return all(torch.equal(got[k], want[k]) for k in want)


def demo(args) -> int:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    base, models = clip_vit_models(args.model, args.models, dtype=dtype)
    base = {k: v.to(device) for k, v in base.items()}
    models = [{k: v.to(device) for k, v in m.items()} for m in models]
    params = sum(v.numel() for v in base.values())
    print(f"CLIP ViT-{args.model}: {params / 1e6:.1f}M parameters, base + {args.models} fine-tuned, {args.dtype}, "
          f"on {device} (built in {time.perf_counter() - started:.1f} s)")

    status = backends()
    names = [n for n, s in status.items() if s.available and (n == "torch" or device.type in s.devices)]
    for n, s in status.items():
        if n not in names:
            print(f"  backend {n}: skipped ({s.reason if not s.available else f'does not run on {device.type}'})")

    ops = {
        "average": (lambda b, out=None: average(models, backend=b, out=out), merge_bytes(models)),
        "task_arithmetic": (lambda b, out=None: task_arithmetic(base, models, 0.3, backend=b, out=out),
                            merge_bytes([base, *models])),
    }
    print(f"\n{'op':<16}{'backend':<9}{'time ms':>9}{'into out ms':>13}{'% of limit':>12}{'max |diff|':>12}  bit-equal")
    for op, (run, nbytes) in ops.items():
        limit = CopyLimit(nbytes, device).seconds(args.repeat)
        reference = run("torch")
        out = {k: torch.empty_like(v) for k, v in reference.items()}
        for name in names:
            got = run(name)
            t = best_time(lambda: run(name), args.repeat, device)
            t_out = best_time(lambda: run(name, out), args.repeat, device)
            print(f"{op:<16}{name:<9}{t * 1e3:>9.1f}{t_out * 1e3:>13.1f}{100 * limit / t_out:>11.0f}%"
                  f"{_max_diff(got, reference):>12.2e}  {'yes' if _bit_equal(got, reference) else 'NO'}")
        print(f"{op:<16}{'copy':<9}{limit * 1e3:>9.1f}{'':>13}{'':>12}   limit: {nbytes / 1e9:.2f} GB moved, "
              f"{nbytes / limit / 1e9:.1f} GB/s")
    return 0


DEFAULT_BUDGET = "256MiB"


def merge(args) -> int:
    from .checkpoint import config as merge_config
    from .checkpoint.merge import Options, run
    from .checkpoint.outdir import Interrupted
    from .checkpoint.safetensors import CheckpointError

    try:
        cfg = merge_config.load(args.config)
        if args.seed is not None:
            cfg.seed = merge_config.check_seed(args.seed, "--seed")
        if args.shard_size is not None:
            cfg.shard_size = merge_config.parse_size(args.shard_size, "--shard-size")
        budget = merge_config.parse_size(args.memory_budget, "--memory-budget")
        if budget < 1000 or (budget < 2**20 and str(args.memory_budget).strip().isdigit()):
            raise merge_config.ConfigError(
                f"--memory-budget {args.memory_budget}: {budget} bytes is too small to merge in reasonable time (a bare "
                "number is bytes; write the unit, e.g. 16GB; at least 1KB)")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise merge_config.ConfigError(f"--device must be cpu or cuda[:i], got {args.device!r}") from None
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.type not in ("cpu", "cuda"):
            raise merge_config.ConfigError(f"--device must be cpu or cuda[:i], got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise merge_config.ConfigError("--device cuda: no CUDA device is available here (use --device cpu)")
        started = time.perf_counter()
        run(cfg, args.out_dir, Options(device, budget, args.backend, args.overwrite, not args.quiet,
                                      not args.buffered_writes))
    except (merge_config.ConfigError, CheckpointError, FileExistsError, MemoryError, ValueError, RuntimeError,
            OSError) as e:
        print(f"fusedmerge merge: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, merge_config.ConfigError) else 1
    except Interrupted as e:
        print(f"fusedmerge merge: stopped by {e}; nothing was written to {args.out_dir} and the temporary "
              "directory was removed", file=sys.stderr)
        return 128 + e.signum
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"merged into {args.out_dir} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="merge synthetic CLIP ViT checkpoints with every backend and report")
    d.add_argument("--model", default="B/32", choices=sorted(CLIP_VIT))
    d.add_argument("--models", type=int, default=8, help="fine-tuned models to merge (default 8)")
    d.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the best is reported")
    sub.add_parser("backends", help="list the backends and why any is missing")
    from .checkpoint.config import METHODS, describe_methods

    m = sub.add_parser("merge", help="merge model directories as a mergekit-style YAML configuration says",
                       epilog="merge methods:\n  " + describe_methods().replace("\n", "\n  "),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", help=f"YAML configuration (mergekit schema; merge_method one of {', '.join(METHODS)})")
    m.add_argument("out_dir", help="output directory (must be empty or absent unless --overwrite)")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:i] (under torchrun, cuda takes LOCAL_RANK)")
    m.add_argument("--memory-budget", default=DEFAULT_BUDGET, help="bytes of input and output tensors held at "
                   "once, prefetch included, e.g. 2GB (default 256MiB; a larger tensor is merged in row blocks where its "
                   "method allows, else alone; plus a write buffer of at most a quarter of it, 64 MB)")
    m.add_argument("--seed", type=int, help="seed of the DARE masks (overrides the configuration's)")
    m.add_argument("--shard-size", help="largest output shard, e.g. 2GB (default 2 GiB)")
    m.add_argument("--backend", default="auto", help="kernel backend (see `fusedmerge backends`)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    m.add_argument("--quiet", action="store_true", help="no progress on stderr")
    m.add_argument("--buffered-writes", action="store_true", help="write the shards through the page cache "
                   "instead of with O_DIRECT (used where the file system takes it: the disk reads the bytes, no CPU "
                   "copies them)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.models < 1 or args.repeat < 1:
            parser.error("--models and --repeat must be at least 1")
        return demo(args)
    if args.command == "merge":
        return merge(args)
    for name, s in backends().items():
        print(f"{name:<8}{'available' if s.available else 'missing':<11}{s.reason}")
    return 0


def entry() -> None:
    """The `fusedmerge` command: main(), then, in a single process, leave without the interpreter's teardown
    (with torch loaded, ~0.4 s of module finalisers) once stdout and stderr are flushed — every file the command
    writes is closed by then. Under torchrun the process exits normally."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
