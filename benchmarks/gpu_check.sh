#!/usr/bin/env bash
# The GPU check: build in place, GPU tests, every benchmark at real sizes, one summary, on a fresh
# machine without network, inside a time budget.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS=420] [--cpu]
#
# --cpu runs the same steps on the CPU with CPU sizes (benchmarks get --device cpu).
# The budget covers the whole script: every step is capped by `timeout` from what is left, and a
# failing step is recorded in the summary, never the end of the run. OUT_DIR stays flat and small
# (at most 8 files): summary.md, run.log, pytest_gpu.log, the CSVs, train_step.png, and
# extras.tar.gz with anything else (other plots, per-step logs).
#
# Environment: MAX_JOBS (default 16) and TORCH_CUDA_ARCH_LIST (default: the GPU's own
# capability, else 9.0) for the build; MLAAN_BUILD_CMD replaces the build command (e.g. a
# serialised build shared by several checkouts); PYTHON (default python).
set -u

OUT="" BUDGET=420 MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) if [ -z "$OUT" ]; then OUT=$arg; else BUDGET=$arg; fi ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS=420] [--cpu]" >&2; exit 2; }
case "$BUDGET" in ''|*[!0-9]*) echo "BUDGET_SECONDS must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RESULTS=$WORK/results
mkdir -p "$RESULTS" "$WORK/logs"
LOG=$WORK/run.log
STATUS=$WORK/status.tsv
: > "$STATUS"
DEVICE=cuda
[ "$MODE" = cpu ] && DEVICE=cpu

left() { echo $((DEADLINE - $(date +%s))); }
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# run NAME SECONDS CMD...: run with a hard stop, log to logs/NAME.log (+ run.log), record the outcome.
run() {
  local name=$1 limit=$2; shift 2
  local log=$WORK/logs/$name.log start rc
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped (budget spent)"
    printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$STATUS"
    return 0
  fi
  say "$name: start (limit ${limit}s): $*"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  cat "$log" >> "$LOG"
  tail -n 25 "$log"
  local took=$(( $(date +%s) - start )) outcome=ok note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome=TIMEOUT note="stopped after ${limit}s"
  elif [ $rc -ne 0 ]; then outcome=FAILED note="exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160 | tr '\t|' '  ')"
  fi
  say "$name: $outcome in ${took}s $note"
  printf '%s\t%s\t%s\t%s\n' "$name" "$outcome" "$took" "$note" >> "$STATUS"
  return 0
}

say "mode $MODE, budget ${BUDGET}s, out $OUT, repo $ROOT"
{ command -v nvidia-smi > /dev/null && nvidia-smi -L; $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"; } 2>&1 | tee -a "$LOG"

# 1. Build the extension in place.
if [ -n "${MLAAN_BUILD_CMD:-}" ]; then
  run build "$(min $((BUDGET / 2)) $(( $(left) - 60 )))" bash -c "$MLAAN_BUILD_CMD"
else
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)
  fi
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST
  say "build: MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  run build "$(min $((BUDGET / 2)) $(( $(left) - 90 )))" $PY -m pip install --no-build-isolation --no-deps -e .
  if [ "$(tail -n 1 "$STATUS" | cut -f2)" != ok ]; then
    run build_inplace "$(min $((BUDGET / 3)) $(( $(left) - 90 )))" $PY setup.py build_ext --inplace
  fi
fi

# 2. What got built and which backends work.
run info 60 $PY -m mlaan_fast info

# 3. The GPU tests. First a gate of seconds: a C++ error message from _C must arrive whole (a _C
#    linked to a private static libstdc++ crashed every C++ error path on the GPU image; setup.py's
#    torch_libstdcxx). Then the GPU tests, with pytest-xdist (on the GPU image) in one worker process
#    that is replaced when a test crashes it: the crash fails that test and the rest still run. The
#    first crashed test is then run once more under cuda-gdb for its native backtrace
#    (logs/crash_backtrace.log in extras.tar.gz, its top in run.log).
ISOLATE=()
$PY -c "import xdist" 2> /dev/null && ISOLATE=(-p xdist -n 1)
run cpp_error_paths 60 $PY -m pytest -q -p no:cacheprovider "${ISOLATE[@]}" \
  tests/test_backend.py::test_cpp_error_messages_arrive_whole
say "pytest -m gpu"
# The files no earlier GPU run reached go first, the rest after, within one limit.
FIRST=(tests/test_graphed_step.py tests/test_compile.py tests/test_trainer.py tests/test_profiling.py
       tests/test_ema_shadow.py)
PYTEST_END=$(( $(date +%s) + $(min 200 $(( $(left) / 2 ))) ))
: > "$WORK/pytest_gpu.log"
rc=0
for part in first rest; do
  if [ "$part" = first ]; then files=("${FIRST[@]}"); else files=(tests); for f in "${FIRST[@]}"; do files+=(--ignore "$f"); done; fi
  limit=$(( PYTEST_END - $(date +%s) ))
  [ "$limit" -ge 5 ] || { rc=124; break; }
  timeout -k 10 "$limit" $PY -m pytest -m gpu -q -p no:cacheprovider -rs --durations=10 "${ISOLATE[@]}" \
    "${files[@]}" >> "$WORK/pytest_gpu.log" 2>&1
  part_rc=$?
  case $part_rc in 0|5) ;; 124|137) rc=124; break ;; *) rc=1 ;; esac
done
tail -n 15 "$WORK/pytest_gpu.log" | tee -a "$LOG"
RESULTS_LINES=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)" "$WORK/pytest_gpu.log" | tr -d '=' \
                | tr '\n' ';' | tr '\t|' '  ')
case $rc in
  0) printf 'pytest -m gpu\tok\t-\t%s\n' "$RESULTS_LINES" >> "$STATUS" ;;
  124) printf 'pytest -m gpu\tTIMEOUT\t-\t%s\n' "see pytest_gpu.log; $RESULTS_LINES" >> "$STATUS" ;;
  *) printf 'pytest -m gpu\tFAILED\t-\t%s\n' "$RESULTS_LINES" >> "$STATUS" ;;
esac
# A crashed test: xdist names it in its summary; a run stopped by the limit only has faulthandler's
# stack, whose innermost tests/ frame names the file and function.
CRASHED=$(grep -o "crashed while running '[^']*'" "$WORK/pytest_gpu.log" "$WORK/logs/cpp_error_paths.log" \
          2> /dev/null | head -n 1 | cut -d"'" -f2)
[ -n "$CRASHED" ] || CRASHED=$(grep -h -A 40 "Fatal Python error" "$WORK/pytest_gpu.log" \
  "$WORK/logs/cpp_error_paths.log" 2> /dev/null | grep -o 'tests/test_[a-z_]*\.py", line [0-9]* in [a-z_0-9]*' \
  | head -n 1 | sed 's/", line [0-9]* in /::/')
if [ -n "$CRASHED" ] && command -v cuda-gdb > /dev/null; then
  say "native backtrace of the crash in $CRASHED"
  run crash_backtrace "$(min 120 $(( $(left) / 5 )))" cuda-gdb -q -batch -ex "set pagination off" -ex run \
    -ex "thread apply all bt 40" --args $PY -m pytest -q -p no:cacheprovider "$CRASHED"
  grep -A 40 "SIGSEGV\|SIGABRT\|signal" "$WORK/logs/crash_backtrace.log" | head -n 60 >> "$LOG"
fi

# 4. Every benchmark, each with a share of what is left (weights: train step 3, aux head 2, others 1).
#    The train step runs every variant; 'compiled' (torch.compile: minutes of compiling) comes last.
#    The module pipeline needs one GPU per stage: it runs with 2 or more GPUs (and in --cpu mode).
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
STAGES=""
for p in 2 4 8; do { [ "$MODE" = cpu ] && [ "$p" = 2 ]; } || [ "$GPUS" -ge "$p" ] && STAGES="$STAGES $p"; done
BENCHES=$(ls benchmarks/bench_*.py 2>/dev/null | grep -v -e bench_train_step.py -e bench_pipeline.py
          [ -n "$STAGES" ] && ls benchmarks/bench_pipeline.py 2>/dev/null
          ls benchmarks/bench_train_step.py 2>/dev/null)
weight() { case "$1" in *bench_train_step.py) echo 3 ;; *bench_aux_head.py) echo 2 ;; *) echo 1 ;; esac; }
remaining_weight=0
for b in $BENCHES; do remaining_weight=$((remaining_weight + $(weight "$b"))); done
for b in $BENCHES; do
  w=$(weight "$b")
  share=$(( ($(left) - 25) * w / remaining_weight ))
  remaining_weight=$((remaining_weight - w))
  name=$(basename "$b" .py)
  args=(--quick --device "$DEVICE" --out "$RESULTS")
  if timeout 60 $PY "$b" --help 2>/dev/null | grep -q -- "--budget"; then
    args+=(--budget "$(( share > 20 ? share - 15 : share * 3 / 4 ))")
  fi
  [ "$name" = bench_train_step ] && args+=(--no-plot)
  # shellcheck disable=SC2086
  [ "$name" = bench_pipeline ] && args+=(--stages $STAGES)
  run "$name" "$share" $PY "$b" "${args[@]}"
done

# 5. Plot and summary (from the CSVs alone, so they exist even when a benchmark was stopped).
if [ -f "$RESULTS/train_step.csv" ]; then
  run plot 60 $PY benchmarks/plot_train_step.py "$RESULTS/train_step.csv" "$RESULTS/train_step.png"
fi
{
  echo "# GPU check ($MODE mode)"
  echo
  echo "$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null); $(date -u '+%Y-%m-%d %H:%M UTC'); budget ${BUDGET}s, used $(( $(date +%s) - T0 ))s; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | outcome | seconds | note |"
  echo "|---|---|---|---|"
  while IFS=$'\t' read -r name outcome took note; do echo "| $name | $outcome | $took | $note |"; done < "$STATUS"
  echo
  echo "## Results"
  echo
  $PY benchmarks/render_results.py --results "$RESULTS" 2>&1
} > "$WORK/summary.md"

# 6. At most 8 flat files in OUT: the main ones, the rest packed.
cp "$WORK/summary.md" "$WORK/run.log" "$WORK/pytest_gpu.log" "$OUT/" 2>/dev/null
count=3
extras=()
copied=" "
for f in "$RESULTS"/train_step.csv "$RESULTS"/*.csv "$RESULTS"/train_step.png "$RESULTS"/*; do
  [ -f "$f" ] || continue
  base=$(basename "$f")
  case "$copied" in *" $base "*) continue ;; esac
  copied="$copied$base "
  if [ $count -lt 7 ]; then cp "$f" "$OUT/"; count=$((count + 1)); else extras+=("results/$base"); fi
done
tar -czf "$OUT/extras.tar.gz" -C "$WORK" logs "${extras[@]}" 2>/dev/null
say "done in $(( $(date +%s) - T0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$WORK/summary.md" | head -n 60
rm -rf "$WORK"
