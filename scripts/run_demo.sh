#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then train a small WBSR supernet on photographs that
# ship with scikit-image, test it with dynamic inference and write the table and plots (see README).
# Extra arguments go to `wbsr-demo`, e.g. `bash scripts/run_demo.sh --out my_demo`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh")
exec "$venv/bin/wbsr-demo" "$@"
