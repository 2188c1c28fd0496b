#!/usr/bin/env bash
# The GPU window in one command: install, build, validate every kernel, measure every target.
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run] [--only STAGES] [--deadline SECONDS] [--budget SECONDS]
#
# For a bare CUDA machine (python3 with torch + triton, nvcc, cmake, pybind11, pytest; no
# network; xrayforge not installed). Wheels the machine lacks (pydicom, nvtx, ...) are taken
# from $XRAYFORGE_WHEELS (default: wheels/ in the repo, an ignored folder: copy them there and
# carry it). Then:
#   1. installs those wheels into a private folder put on PYTHONPATH (torch is never touched);
#   2. builds the CUDA extension for sm_90 only with CMake, under a time cap, into xrayforge/
#      (build.log); a failed build is recorded and the Triton stages still run;
#   3. installs the project in place (pip --no-build-isolation --no-deps -e .; else PYTHONPATH);
#   4. runs the stages (python -m xrayforge.bench.gpu_check): env, tests, ops, conv (the fused
#      equalized-lr convolution at every layer shape), train, fid, knn (radii of 100k × 100k
#      2048-d features), sampling, each under its own cap, recorded as passed / failed / timed
#      out / skipped; the whole command ends within --deadline (default 540 s: the stages get what setup left),
#      or the stages alone get --budget seconds.
# Writes at most five files to --out (default $OUT, else gpu-check/): gpu_check.json,
# gpu_check.md, gpu_check.log, gpu_tests.xml, build.log; a folder that holds an earlier
# gpu_check.json is refused (a new --out per run; combine runs with --merge).
# --dry-run: the same stages at tiny sizes on this CPU (Triton in the interpreter, CUDA-only
# parts skipped and marked so); no build or install (the project must already be importable).
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }

OUT_DIR=$(absolute "${OUT:-gpu-check}")
DRY=0
ONLY=""
BUDGET=""
DEADLINE=540
BUILD_CAP="${XRAYFORGE_BUILD_CAP:-240}"
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$(absolute "$2"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --deadline) DEADLINE="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -e "$OUT_DIR/gpu_check.json" ]; then
  echo "gpu_check.sh: $OUT_DIR already holds a gpu_check.json (an earlier run); choose a new --out" \
       "(python -m xrayforge.bench.gpu_check --merge combines runs)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
BUILD_LOG="$OUT_DIR/build.log"
SETUP_JSON="$OUT_DIR/.setup.json"
: > "$LOG"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

declare -A SETUP=()
t_all=$(date +%s)

# ---------------------------------------------------------------- 1. wheels
WHEELS=$(absolute "${XRAYFORGE_WHEELS:-$ROOT/wheels}")
SITE="${TMPDIR:-/tmp}/xrayforge-site"
installed=()
failed=()
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  mkdir -p "$SITE"
  for whl in "$WHEELS"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
      continue  # already there: keep the machine's own version
    fi
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$whl" >>"$BUILD_LOG" 2>&1; then
      installed+=("$name")
    else
      failed+=("$name")
    fi
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  SETUP[wheels]="installed: ${installed[*]:-none}; failed: ${failed[*]:-none} (from $WHEELS)"
else
  SETUP[wheels]="no wheels in $WHEELS"
fi
say "wheels: ${SETUP[wheels]}"

# ---------------------------------------------------------------- 2. CUDA extension, 3. install
if [ "$DRY" = 1 ]; then
  SETUP[cuda_extension]="not built (dry run)"
  SETUP[install]="not installed (dry run: the project must already be importable)"
else
  t0=$(date +%s)
  nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  say "building the CUDA extension for sm_90 (cap ${BUILD_CAP} s) -> build.log"
  if timeout "$BUILD_CAP" bash -c '
      set -e
      cmake -S "$1" -B "$1/build/gpu-check" -DCMAKE_CUDA_COMPILER="$2" -DXRAYFORGE_CUDA_ARCHS=90 \
            -DXRAYFORGE_OUTPUT_DIR="$1/xrayforge" -DPython_EXECUTABLE="$(command -v "$3")" -DCMAKE_BUILD_TYPE=Release
      cmake --build "$1/build/gpu-check" --parallel "$(nproc)"' _ "$ROOT" "$nvcc_bin" "$PY" >>"$BUILD_LOG" 2>&1; then
    SETUP[cuda_extension]="built for sm_90 in $(( $(date +%s) - t0 )) s"
  else
    rc=$?
    [ "$rc" = 124 ] && why="timed out after ${BUILD_CAP} s" || why="failed (exit $rc)"
    SETUP[cuda_extension]="$why: see build.log; the Triton and torch stages still run"
  fi
  say "CUDA extension: ${SETUP[cuda_extension]}"
  if XRAYFORGE_BUILD_CUDA=0 timeout 120 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
      >>"$BUILD_LOG" 2>&1; then
    SETUP[install]="pip install --no-build-isolation --no-deps -e . (the extension, if built, in place)"
  else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    SETUP[install]="pip install failed (see build.log): running from the source tree on PYTHONPATH"
  fi
  say "install: ${SETUP[install]}"
fi
SETUP[setup_seconds]=$(( $(date +%s) - t_all ))

{
  printf '{'
  sep=""
  for k in "${!SETUP[@]}"; do
    v=${SETUP[$k]//\\/\\\\}
    if [[ "$v" =~ ^[0-9]+$ ]]; then
      printf '%s"%s": %s' "$sep" "$k" "$v"
    else
      printf '%s"%s": "%s"' "$sep" "$k" "${v//\"/\\\"}"
    fi
    sep=", "
  done
  printf '}\n'
} > "$SETUP_JSON"

# ---------------------------------------------------------------- 4. the stages
args=(--out "$OUT_DIR" --setup "$SETUP_JSON")
[ "$DRY" = 1 ] && args+=(--dry-run)
[ -n "$ONLY" ] && args+=(--only "$ONLY")
if [ -z "$BUDGET" ] && [ "$DRY" = 0 ]; then
  BUDGET=$(( DEADLINE - ${SETUP[setup_seconds]} - 10 ))  # 10 s for writing the report
  [ "$BUDGET" -lt 60 ] && BUDGET=60
fi
[ -n "$BUDGET" ] && args+=(--budget "$BUDGET")
say "stages: $PY -m xrayforge.bench.gpu_check ${args[*]}"
"$PY" -m xrayforge.bench.gpu_check "${args[@]}"
rc=$?
rm -f "$SETUP_JSON"
say "done in $(( $(date +%s) - t_all )) s (exit $rc); files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit "$rc"
