#!/usr/bin/env bash
# The whole test suite once per CPU kernel family: float32 results differ between them, so a suite that passes on
# one CPU can fail on another. Each run makes PyTorch dispatch the kernels of a CPU of that class:
#   default  ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41,       MKL_ENABLE_INSTRUCTIONS=SSE4_2
#   avx2     ATEN_CPU_CAPABILITY=avx2,    ONEDNN_MAX_CPU_ISA=AVX2,        MKL_ENABLE_INSTRUCTIONS=AVX2
#   avx512   ATEN_CPU_CAPABILITY=avx512,  ONEDNN_MAX_CPU_ISA=AVX512_CORE, MKL_ENABLE_INSTRUCTIONS=AVX512
# (ATEN_CPU_CAPABILITY alone leaves convolutions on oneDNN's best kernels for this CPU: an AVX-512 machine then
# passes a test that fails on an AVX2-only one.) avx512 runs only where the CPU has it (avx512f in /proc/cpuinfo).
# Not part of CI (three suites: about 8 minutes on 2 cores); run it before any change to numerics or tests lands.
# Arguments go to pytest, e.g. `bash scripts/test_cpu_kernels.sh -k tiles`. Exit status: 0 when every run passed.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kernels=(default avx2)
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  kernels+=(avx512)
else
  echo "test_cpu_kernels: this CPU has no AVX-512; avx512 is not run" >&2
fi
declare -A onednn=([default]=SSE41 [avx2]=AVX2 [avx512]=AVX512_CORE)
declare -A mkl=([default]=SSE4_2 [avx2]=AVX2 [avx512]=AVX512)
failed=()
summary=()
for k in "${kernels[@]}"; do
  echo "== test_cpu_kernels: $k" >&2
  log=$(mktemp)
  ATEN_CPU_CAPABILITY=$k ONEDNN_MAX_CPU_ISA=${onednn[$k]} MKL_ENABLE_INSTRUCTIONS=${mkl[$k]} \
    bash "$root/scripts/run_tests.sh" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  summary+=("$k: $(grep -E '(passed|failed|error)' "$log" | tail -1)")
  rm -f "$log"
  [ "$status" -eq 0 ] || failed+=("$k")
done
echo "== test_cpu_kernels summary" >&2
printf '%s\n' "${summary[@]}" >&2
if [ ${#failed[@]} -gt 0 ]; then
  echo "test_cpu_kernels: failed under ${failed[*]}" >&2
  exit 1
fi
