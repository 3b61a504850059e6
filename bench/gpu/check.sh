#!/usr/bin/env bash
# GPU readiness check (issue 12, item 7), made for ONE call of the device tool (see bench/gpu/README.md):
#   1. build fusedmerge with the CUDA extension for sm_90 against the machine's own torch and triton
#      (pip --no-build-isolation into a scratch --target folder: no network, the checkout stays untouched);
#   2. the whole test suite, GPU tests included, importing the installed package (junit XML + log);
#   3. the compact benchmark (bench/gpu/compact_bench.py: copy limit, average / task arithmetic / DARE / TIES
#      on CLIP ViT-B/32 and L/14, bf16 and fp32, N = 8, every backend on cuda tensors, bits against torch).
# Everything goes to $OUT (8 files at most come back: summary.txt env.txt build.log pytest.log junit.xml
# bench.json bench.md bench.log); each step's exit status and seconds go to $OUT/summary.txt. A failed step
# does not stop the next ones; the exit status is non-zero when any step failed. The steps' time limits
# add up to CHECK_BUDGET_S seconds (default 450, so that the whole call ends within 8 minutes; dry run 1800).
#
#   bash bench/gpu/check.sh             # on the GPU machine
#   bash bench/gpu/check.sh --dry-run   # without a GPU: CUDA optional (AUTO), tests/test_build.py and
#                                       # tests/test_gpu.py only, a tiny benchmark on the CPU; OUT defaults
#                                       # to a new temporary folder
# Knobs (environment): CHECK_BUDGET_S; CHECK_TESTS (test paths/options instead of the whole suite);
# CHECK_BENCH_ARGS (more compact_bench.py options, e.g. "--models B/32"); PYTEST_WORKERS (xdist, default
# min(8, cores)); PYTHON (default python3); KEEP_WORK=1 keeps the scratch build folder.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu/check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/fm-gpu-out.XXXXXX")}
mkdir -p "$OUT" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fm-gpu-work.XXXXXX") || exit 2  # build tree + installed package
if [[ -z ${KEEP_WORK:-} ]]; then trap 'rm -rf "$WORK"' EXIT; fi
PY=${PYTHON:-python3}
SITE=$WORK/site
if ((DRY)); then BUDGET=${CHECK_BUDGET_S:-1800}; else BUDGET=${CHECK_BUDGET_S:-450}; fi
END=$((SECONDS + BUDGET))
FAILED=0
: >"$OUT/summary.txt"

export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
if ! command -v nvcc >/dev/null; then  # the CUDA image may keep nvcc off the PATH
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [[ -x $d/nvcc ]]; then PATH=$PATH:$d; break; fi
  done
fi

limit() {  # limit CAP RESERVE: CAP seconds, less if that would eat the RESERVE kept for the later steps
  local left=$((END - SECONDS - $2))
  ((left < $1)) || left=$1
  ((left > 10)) || left=10
  echo "$left"
}

record() {  # record NAME RC START: one line of summary.txt
  printf '%-10s rc=%-4s %5ss\n' "$1" "$2" "$((SECONDS - $3))" | tee -a "$OUT/summary.txt"
  [[ $2 == 0 ]] || FAILED=1
}

echo "== fusedmerge GPU check$( ((DRY)) && echo ' (dry run)'): $(pwd) -> $OUT"

# ---- 0. the machine: nvidia-smi, compilers, Python packages, what torch sees ----
t=$SECONDS
{
  echo "## date"; date -u
  echo "## uname"; uname -a
  echo "## nproc"; nproc
  echo "## nvidia-smi"; timeout 30 nvidia-smi || echo "nvidia-smi: not available"
  echo "## nvcc"
  if command -v nvcc; then timeout 30 nvcc --version; else echo "nvcc: not found"; fi
  echo "## cmake / ninja / c++"
  timeout 10 cmake --version | head -1; timeout 10 ninja --version; timeout 10 c++ --version | head -1
  echo "## python"
  timeout 60 "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "scikit-build-core", "pybind11", "cmake", "ninja", "pytest",
             "pytest-xdist", "pytest-timeout", "hypothesis", "transformers", "pyyaml", "safetensors",
             "fusion-bench", "mergekit"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name(0)}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
    sys.exit(0 if (p.major, p.minor) == (9, 0) else 3)  # this check builds for sm_90 only
sys.exit(3)  # no GPU: a failure on the device machine, expected in a dry run
EOF
} >"$OUT/env.txt" 2>&1
rc=$?
((DRY && rc == 3)) && rc=0
record env "$rc" "$t"

# ---- 1. build with the CUDA extension for sm_90 (dry run: AUTO, CUDA built only where nvcc is found) ----
build() {  # build MODE: pip-install the checkout into $SITE with FUSEDMERGE_CUDA=MODE
  echo "#### FUSEDMERGE_CUDA=$1 CMAKE_CUDA_ARCHITECTURES=90" >>"$OUT/build.log"
  FUSEDMERGE_CUDA=$1 timeout -k 10 "$(limit "$2" "$3")" "$PY" -m pip install -v --no-build-isolation --no-deps \
    --no-cache-dir --upgrade --target "$SITE" -C build-dir="$WORK/build-$1" -C build.verbose=true \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 . >>"$OUT/build.log" 2>&1
}
t=$SECONDS
if ((DRY)); then build AUTO 600 0; else build ON 180 280; fi
rc=$?
record build "$rc" "$t"
if ((rc != 0)); then  # still test and time what builds without CUDA C++ (Triton, torch, the CPU kernels)
  tail -20 "$OUT/build.log"
  t=$SECONDS; build OFF 120 250; record build-off $? "$t"
fi
grep -E "fusedmerge: (building|CUDA extension)" "$OUT/build.log"
CUOBJDUMP=$(command -v cuobjdump || "$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__),
  "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null)  # triton's wheel carries one
for so in "$SITE"/fusedmerge/_cuda*.so; do  # which machine code and PTX the CUDA extension carries
  [[ -e $so ]] && { echo "#### $CUOBJDUMP $so"; timeout 30 "$CUOBJDUMP" --list-elf --list-ptx "$so"; } >>"$OUT/build.log" 2>&1
done

# ---- 2. the test suite, importing the installed package, not the checkout's fusedmerge/ ----
t=$SECONDS
if "$PY" -P -c 'import sys, fusedmerge; print(fusedmerge.__file__, fusedmerge.backends(), sep="\n")
sys.exit(not fusedmerge.__file__.startswith(sys.argv[1]))' "$SITE" >"$OUT/pytest.log" 2>&1; then
  TESTS=() XDIST=() THREADS=()
  ((DRY)) && TESTS=(tests/test_build.py tests/test_gpu.py)
  [[ -n ${CHECK_TESTS:-} ]] && read -ra TESTS <<<"$CHECK_TESTS"
  if "$PY" -c 'import xdist' 2>/dev/null; then  # workers get whole files: session fixtures built once
    workers=${PYTEST_WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
    XDIST=(-n "$workers" --dist loadfile)
    THREADS=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) > workers ? $(nproc) / workers : 1 ))}")
  fi
  # python -P keeps the checkout's root off sys.path, as CI's `pytest` console script does; SIGINT at the
  # time limit lets pytest stop cleanly and still write its summary and junit XML
  env "${THREADS[@]}" timeout -s INT -k 20 "$(limit 270 110)" "$PY" -P -m pytest -p no:cacheprovider -v \
    --durations=25 --junitxml="$OUT/junit.xml" "${XDIST[@]}" "${TESTS[@]}" >>"$OUT/pytest.log" 2>&1
  rc=$?
else
  rc=90  # the installed package is not the one imported
fi
tail -25 "$OUT/pytest.log"
record tests "$rc" "$t"

# ---- 3. the compact benchmark ----
t=$SECONDS
if ((DRY)); then BENCH=(--device cpu --quick); else BENCH=(--device cuda); fi
[[ -n ${CHECK_BENCH_ARGS:-} ]] && read -ra MORE <<<"$CHECK_BENCH_ARGS" && BENCH+=("${MORE[@]}")
lim=$(limit 600 5)
timeout -k 10 "$lim" "$PY" -P bench/gpu/compact_bench.py "${BENCH[@]}" --budget $((lim * 2 / 3)) \
  --json "$OUT/bench.json" --md "$OUT/bench.md" >"$OUT/bench.log" 2>&1
rc=$?
record bench "$rc" "$t"
{ echo "## nvidia-smi after the benchmark"; timeout 20 nvidia-smi; } >>"$OUT/env.txt" 2>&1

echo; cat "$OUT/bench.md" 2>/dev/null || tail -20 "$OUT/bench.log"
echo; echo "== summary ($OUT)"; cat "$OUT/summary.txt"
exit "$FAILED"
