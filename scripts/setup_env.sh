#!/usr/bin/env bash
# Creates or reuses the project's virtual environment and installs the project into it (editable).
# Prints the environment's path on stdout; everything else goes to stderr.
#
# The environment lives outside the clone, in ${WBSR_VENV:-~/.cache/wbsr/venv-<key>}, where <key> hashes
# the dependency list in setup.py and the Python version: a second run with the same dependencies
# reinstalls nothing, a changed dependency list builds a new environment from scratch.
#
# Order matters: BasicSR's sdist needs torch at build time (setup_requires), so torch and torchvision
# are installed first and BasicSR is then built against them (--no-build-isolation) instead of pulling a
# second, multi-GB torch into an isolated build environment.
#
# Offline, on a machine that reaches no package index but whose Python already holds torch and torchvision (the
# GPU machine of bench/gpu_run.sh, whose image has them built for its CUDA): WBSR_WHEELHOUSE=DIR installs the
# wheels in DIR (BasicSR and lmdb, which bench/gpu_pack.py writes) and the project (editable), all without
# dependencies and without an index, into that Python's own environment (${PYTHON:-python3}; it must be a virtual
# environment or another prefix with bin/python), and prints that environment's path. The other dependencies
# must already be there: the import check at the end names a missing one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

if [ -n "${WBSR_WHEELHOUSE:-}" ]; then
  prefix=$("$python" -c 'import sys; print(sys.prefix)')
  if [ ! -x "$prefix/bin/python" ]; then
    echo "setup_env: WBSR_WHEELHOUSE: $python's environment $prefix has no bin/python" >&2
    exit 2
  fi
  if ! "$python" -c 'import torch, torchvision' 2>/dev/null; then
    echo "setup_env: WBSR_WHEELHOUSE: $python has no torch/torchvision to install the project over" >&2
    exit 2
  fi
  shopt -s nullglob
  wheels=("$WBSR_WHEELHOUSE"/*.whl)
  if [ ${#wheels[@]} = 0 ]; then
    echo "setup_env: WBSR_WHEELHOUSE=$WBSR_WHEELHOUSE holds no .whl files (bench/gpu_pack.py writes them)" >&2
    exit 2
  fi
  echo "setup_env: installing ${wheels[*]##*/} and the project into $prefix, offline" >&2
  "$python" -m pip install -q --no-index --no-deps "${wheels[@]}" >&2
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$root" >&2
  "$prefix/bin/python" -c 'import torch, torchvision, cv2, skimage, sklearn, yaml, PIL, tqdm, pytest, hypothesis
import basicsr, wbsr_models' >&2
  echo "$prefix"
  exit 0
fi
deps=$(sed -n '/^INSTALL_REQUIRES = \[/,/^\]/p; /^TEST_REQUIRES = /p' "$root/setup.py")
key=$(printf '%s\n%s\n' "$deps" "$("$python" --version 2>&1)" | sha256sum | cut -c1-12)
venv=${WBSR_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/wbsr/venv-$key}

if [ ! -f "$venv/.complete" ]; then
  echo "setup_env: building $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -U pip setuptools wheel >&2
  "$venv/bin/python" -m pip install -q 'torch>=2.1' 'torchvision>=0.16' >&2
  "$venv/bin/python" -m pip install -q --no-build-isolation -e "$root[test]" >&2
  touch "$venv/.complete"
else
  echo "setup_env: reusing $venv" >&2
  # Point the editable install at this clone (a CI clone lives at a new path each time).
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root[test]" >&2
fi
echo "$venv"
