#!/usr/bin/env bash
# The test command: set up (or reuse) the environment, then run the whole suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k hes -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh")
cd "$root"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; that is a failure" >&2
fi
exit "$status"
