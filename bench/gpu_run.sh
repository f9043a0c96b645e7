#!/usr/bin/env bash
# The GPU run, in one call that ends within 9 minutes on one H100/H200 (README, "GPU run"):
#   1. setup   scripts/setup_env.sh (with --wheels: offline, into the machine's own Python, which holds torch)
#   2. data    HR/LR x4 datasets train291, B100, Urban100 from the --data folders (bench/gpu_run.py prepare)
#   3. tests   the suite's CUDA-marked tests (pytest -m gpu)
#   4. train   the reference SRResNet supernet recipe on the 291-image pool, AMP, 12 data workers, for as many
#              iterations as fit in about 5 minutes (a calibration run measures the step time first)
#   5. bench   the new and the reference checkpoint on B100 and Urban100: PSNR/SSIM, FLOPs, CUDA-synchronised
#              wall time and images/s of full, fixed subnets, tiles Eq. 15 and budgets, patches Eq. 15
#   6. summary OUT/README.md and OUT/results.tar.gz (everything but the data and the intermediate checkpoints)
# Everything goes under --out: steps.tsv (status, seconds, limit of each step), logs/<step>.log, datasets/, train/,
# net_g_gpu.pth (the new checkpoint), bench/. Each step has a time limit; the training gets what is left of the
# --budget-s seconds after steps 1-3, less the benchmark's and the summary's shares, at most --train-s.
#
# --dry-run: the same steps on the CPU in about a minute: synthetic images (packed by bench/gpu_pack.py as for a
# device call), the CUDA tests with the CPU standing in for CUDA, a tiny supernet trained for 3 iterations.
#
# usage: bench/gpu_run.sh [--dry-run] [--out DIR] [--data DIR ...] [--wheels DIR | --python PY]
#                         [--budget-s S] [--train-s S] [--workers N] [--no-amp]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

dry=0 out='' wheels='' python='' budget=520 train_max=300 workers='' amp=1 data=()
usage() { sed -n '/^# usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# //' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --data|--wheels)
      [ -d "${2:-}" ] || { echo "gpu_run: $1 ${2:-}: no such folder" >&2; exit 2; }
      if [ "$1" = --data ]; then data+=("$(cd "$2" && pwd)"); else wheels=$(cd "$2" && pwd); fi
      shift ;;
    --python) python=$2; shift ;;
    --budget-s) budget=$2; shift ;;
    --train-s) train_max=$2; shift ;;
    --workers) workers=$2; shift ;;
    --no-amp) amp=0 ;;
    -h|--help) usage ;;
    *) echo "gpu_run: unknown argument $1" >&2; usage ;;
  esac
  shift
done
if [ "$dry" = 0 ] && [ ${#data[@]} = 0 ]; then
  echo 'gpu_run: --data DIR is needed (the benchmark images in the shared layout: bench/gpu_pack.py writes one)' >&2
  exit 2
fi
[ -n "$out" ] || out=$root/bench_out/gpu_run$([ "$dry" = 1 ] && echo _dry || true)
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
if [ -e "$out/steps.tsv" ]; then
  echo "gpu_run: $out holds an earlier run (steps.tsv); choose another --out" >&2
  exit 2
fi
printf 'step\tstatus\tseconds\tlimit\n' > "$out/steps.tsv"
cd "$root"
export PYTHONUNBUFFERED=1
# The dry run's networks are tiny: one thread each is faster than two that wait for each other on a busy CPU.
[ "$dry" = 0 ] || export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$SECONDS
failed=0

# step NAME LIMIT CMD...: run CMD under a time limit, its output in logs/NAME.log (and the last lines on stderr)
step() {
  local name=$1 limit=$2 t0=$SECONDS status=0
  shift 2
  echo "gpu_run: $name (limit ${limit} s)" >&2
  timeout --kill-after=15 "$limit" "$@" > "$out/logs/$name.log" 2>&1 || status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >> "$out/steps.tsv"
  tail -n 5 "$out/logs/$name.log" | sed "s/^/  $name: /" >&2
  [ "$status" = 0 ] || { echo "gpu_run: $name failed (status $status, see $out/logs/$name.log)" >&2; failed=1; }
  return "$status"
}
left() { echo $((budget - (SECONDS - start))); }

# 1. setup (setup_env.sh prints the environment's folder on stdout)
if [ -z "$python" ]; then
  step setup 240 env WBSR_WHEELHOUSE="$wheels" bash -c 'bash "$1" > "$2"' - "$root/scripts/setup_env.sh" \
    "$out/logs/setup.path" || exit 1
  python=$(cat "$out/logs/setup.path")/bin/python
fi
"$python" -c 'import torch, basicsr, wbsr_models' || { echo "gpu_run: $python cannot import the project" >&2; exit 1; }

# 2. data (the dry run without --data synthesises images and packs them as bench/gpu_pack.py does for a device call)
data_args=()
for d in "${data[@]}"; do data_args+=(--data "$d"); done
if [ "$dry" = 1 ]; then
  [ ${#data[@]} -gt 0 ] || data_args=(--synth "$out/data")
  workers=${workers:-1} train_max=90 time_images=1 repeats=1 jobs=0
else
  workers=${workers:-$(( $(nproc) > 14 ? 12 : $(nproc) - 2 ))} time_images=10 repeats=3 jobs=$(( $(nproc) - 2 ))
fi
step data 120 "$python" "$root/bench/gpu_run.py" prepare "${data_args[@]}" --out "$out/datasets" \
  --jobs "$([ "$dry" = 1 ] && echo 1 || echo 4)" || exit 1

# 3. tests: the CUDA-marked tests (on the CPU in the dry run)
test_env=()
[ "$dry" = 1 ] && test_env=(WBSR_GPU_TESTS_ON_CPU=1)
step tests 150 env "${test_env[@]}" "$python" -m pytest -q -rs -p no:cacheprovider -m gpu \
  --junitxml="$out/tests/junit.xml" tests || true
grep -q ' passed' "$out/logs/tests.log" || { echo 'gpu_run: no CUDA test passed' >&2; failed=1; }

# 4. train: what is left, less the benchmark's 150 s and the summary's 20 s, at most --train-s
train_s=$(( $(left) - 170 ))
[ "$train_s" -le "$train_max" ] || train_s=$train_max
[ "$dry" = 0 ] || train_s=$train_max
model=()
if [ "$train_s" -ge 60 ]; then
  amp_flag=()
  [ "$amp" = 1 ] && amp_flag=(--amp)
  dry_flag=()
  [ "$dry" = 1 ] && dry_flag=(--dry-run)
  if step train $((train_s + 30)) "$python" "$root/bench/gpu_run.py" train --datasets "$out/datasets" \
      --out "$out/train" --seconds "$train_s" --workers "$workers" "${amp_flag[@]}" "${dry_flag[@]}"; then
    cp "$out/train/net_g_gpu.pth" "$out/net_g_gpu.pth"
    model=(--model "$out/net_g_gpu.pth")
  fi
else
  echo "gpu_run: only ${train_s} s left for training; skipped" >&2
  printf 'train\tskipped\t0\t%s\n' "$train_s" >> "$out/steps.tsv"
  failed=1
fi

# 5. bench
bench_s=$(( $(left) - 20 ))
[ "$dry" = 0 ] || bench_s=120
[ "$bench_s" -ge 30 ] || bench_s=30
dry_flag=()
[ "$dry" = 1 ] && dry_flag=(--dry-run)
# the dry run compares with its calibration run's tiny checkpoint: the reference network is slow on a CPU
reference=()
[ "$dry" = 1 ] && reference=(--reference "$out/train/experiments/gpu_calibrate/models/net_g_latest.pth")
step bench "$bench_s" "$python" "$root/bench/gpu_run.py" bench --datasets "$out/datasets" "${model[@]}" \
  "${reference[@]}" --out "$out/bench" --time-images "$time_images" --repeats "$repeats" --jobs "$jobs" \
  --seconds $((bench_s - 10)) "${dry_flag[@]}" || true

# 6. summary
step summary 60 "$python" "$root/bench/gpu_run.py" summary --out "$out" || true
echo "gpu_run: $((SECONDS - start)) s in all; results in $out (README.md, results.tar.gz$([ ${#model[@]} -gt 0 ] \
  && echo ', net_g_gpu.pth'))" >&2
exit "$failed"
