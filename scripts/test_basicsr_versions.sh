#!/usr/bin/env bash
# Runs the test suite against the BasicSR builds users install from PyPI other than the one
# scripts/setup_env.sh installs (the newest `basicsr` release in setup.py's range), each in its own
# virtual environment:
#   - every other `basicsr` release inside setup.py's range (none today: 1.4.2 is the only release in
#     >=1.4.2,<1.5);
#   - `basicsr-fixed` (1.4.2), the copy of BasicSR that users install to get a BasicSR that imports on
#     current torchvision; it installs the same `basicsr` package, built from BasicSR's later master.
# WBSR_BASICSR_VARIANTS="basicsr==1.4.2 basicsr-fixed==1.4.2" replaces that list. The environments live
# under ${WBSR_VERSIONS_DIR:-/tmp/wbsr-basicsr-versions} and are removed at the end unless
# WBSR_KEEP_VENVS=1. Extra arguments go to pytest. Takes about 1.5 min per environment plus the suite.
# Not part of .ci/run (CI's time goes to the suite and the main job); run it before changing the pin.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
dir=${WBSR_VERSIONS_DIR:-/tmp/wbsr-basicsr-versions}
mkdir -p "$dir"

# setup.py's lists, without BasicSR itself: the variant provides it.
read -r spec deps < <("$python" - "$root/setup.py" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1], encoding='utf-8').read())
lists = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
         for t in node.targets if isinstance(t, ast.Name) and t.id in ('INSTALL_REQUIRES', 'TEST_REQUIRES')}
basicsr = [r for r in lists['INSTALL_REQUIRES'] if r.startswith('basicsr')]
others = [r for r in lists['INSTALL_REQUIRES'] + lists['TEST_REQUIRES'] if not r.startswith('basicsr')]
print(basicsr[0][len('basicsr'):], ' '.join(others))
PY
)

if [ -n "${WBSR_BASICSR_VARIANTS:-}" ]; then
  read -r -a variants <<<"$WBSR_BASICSR_VARIANTS"
else
  released=$("$python" -m pip index versions basicsr 2>/dev/null | sed -n 's/^Available versions: //p')
  mapfile -t in_range < <("$python" - "$spec" "$released" <<'PY'
import sys
from pip._vendor.packaging.specifiers import SpecifierSet
from pip._vendor.packaging.version import Version
versions = sorted((Version(v) for v in sys.argv[2].replace(',', ' ').split() if v in SpecifierSet(sys.argv[1])),
                  reverse=True)
print('\n'.join(f'basicsr=={v}' for v in versions[1:]))  # the newest is what setup_env.sh installs
PY
  )
  variants=()
  for v in "${in_range[@]}"; do [ -n "$v" ] && variants+=("$v"); done
  variants+=("basicsr-fixed")
fi
echo "test_basicsr_versions: BasicSR range $spec; testing: ${variants[*]}" >&2

status=0
summary=()
for variant in "${variants[@]}"; do
  venv="$dir/venv-$(printf '%s' "$variant" | tr -c 'A-Za-z0-9.' '_')"
  echo "test_basicsr_versions: $variant in $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -U pip setuptools wheel >&2
  # BasicSR's sdists need torch (and cython, numpy) at build time: install them first, build without isolation.
  "$venv/bin/python" -m pip install -q 'torch>=2.1' 'torchvision>=0.16' cython numpy >&2
  "$venv/bin/python" -m pip install -q --no-build-isolation "$variant" >&2
  # --no-deps: the project's `basicsr` requirement would replace a variant of another distribution name
  # (pip then reports that requirement as missing; the variant provides the package).
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root" >&2
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q $deps >&2
  version=$("$venv/bin/python" -c 'import basicsr; print(basicsr.__version__)')
  echo "test_basicsr_versions: $variant imports as basicsr $version" >&2
  rc=0
  (cd "$root" && "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@") || rc=$?
  summary+=("$variant (basicsr $version): pytest exit $rc")
  [ "$rc" -eq 0 ] || status=1
  [ "${WBSR_KEEP_VENVS:-0}" = 1 ] || rm -rf "$venv"
done
printf 'test_basicsr_versions: %s\n' "${summary[@]}" >&2
exit "$status"
