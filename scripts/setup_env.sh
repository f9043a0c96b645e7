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
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
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
