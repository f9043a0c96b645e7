"""Glue between the WBSR plugin and BasicSR.

Installed with a ``.pth`` file, :func:`install` arms a one-shot import hook: the first ``import basicsr``
in any Python process (``python -m basicsr.train``, ``basicsr/test.py`` from a checkout, a notebook)
registers every WBSR type in BasicSR's registries, so option files can name them without an import
line. Set ``WBSR_DISABLE_HOOK=1`` to switch the hook off; importing any ``wbsr_*`` package still
registers all four.

Two upstream breakages of the basicsr 1.4.2 release are handled here, for the hook and for explicit
imports alike:

* ``basicsr.data.degradations`` imports ``torchvision.transforms.functional_tensor``, which
  torchvision 0.17 removed. Where that module is missing, an alias module providing the one function
  BasicSR uses (``rgb_to_grayscale``) is put in ``sys.modules`` before BasicSR is imported. A
  torchvision that still has the module, or a patched BasicSR that no longer imports it, is left alone.
* ``python -m basicsr.train`` derives its root path from ``basicsr/train.py``'s own location, so an
  installed BasicSR writes ``experiments/`` into site-packages. When the root path BasicSR computes is
  a site-packages directory, the current working directory is used instead (and the log says so).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import site
import sys
import sysconfig
import types
import warnings
from typing import Any, Iterable

ENV_DISABLE = 'WBSR_DISABLE_HOOK'
PLUGIN_PACKAGES = ('wbsr_arch', 'wbsr_data', 'wbsr_losses', 'wbsr_models')
NAME_PREFIXES = ('WBSR', 'HES', 'BD')
_TV_FUNCTIONAL_TENSOR = 'torchvision.transforms.functional_tensor'


class RegistrationError(KeyError):
    """A WBSR type could not be registered in a BasicSR registry (name taken or badly prefixed)."""


def hook_disabled() -> bool:
    return os.environ.get(ENV_DISABLE, '').strip().lower() not in ('', '0', 'false', 'no')


def prepare_basicsr_import() -> None:
    """Make ``import basicsr`` work on a current torchvision (see the module docstring)."""
    if _TV_FUNCTIONAL_TENSOR in sys.modules:
        return
    try:
        if importlib.util.find_spec(_TV_FUNCTIONAL_TENSOR) is not None:
            return  # torchvision < 0.17 still ships it
        from torchvision.transforms import functional
    except ImportError:
        return  # no torchvision at all: BasicSR's own import error will say so
    shim = types.ModuleType(_TV_FUNCTIONAL_TENSOR,
                            'Alias installed by wbsr_hook: torchvision >= 0.17 removed this module.')
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[_TV_FUNCTIONAL_TENSOR] = shim


def register(registry: Any, objects: Iterable[type]) -> None:
    """Register ``objects`` in a BasicSR ``registry`` under their class names, all or none.

    Names must start with WBSR, HES or BD so they can never collide with BasicSR's own. Registering
    the same class again (a module imported twice) is a no-op; a different class under a taken name
    raises :class:`RegistrationError` naming it, and nothing in the list is registered.
    """
    objects = list(objects)
    todo = []
    for obj in objects:
        name = obj.__name__
        if not name.startswith(NAME_PREFIXES):
            raise RegistrationError(f'{name}: WBSR registry names must start with one of {NAME_PREFIXES}')
        if name in registry:
            old = registry.get(name)
            same = old is obj or (old.__module__, old.__qualname__) == (obj.__module__, obj.__qualname__)
            if not same:
                raise RegistrationError(f"'{name}' is already registered in BasicSR's {registry._name} registry "
                                        f'by {old.__module__}; nothing from this list was registered')
            continue
        todo.append(obj)
    for obj in todo:
        registry.register(obj)


def register_all() -> None:
    """Import the four plugin packages; each registers its own types on import."""
    for name in PLUGIN_PACKAGES:
        importlib.import_module(name)


def _site_packages_dirs() -> set[str]:
    dirs = set()
    for key in ('purelib', 'platlib'):
        try:
            dirs.add(os.path.realpath(sysconfig.get_paths()[key]))
        except KeyError:
            pass
    try:
        dirs.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # virtualenv's old site module
        pass
    user = getattr(site, 'USER_SITE', None)
    if user:
        dirs.add(os.path.realpath(user))
    return dirs


def fixed_root_path(root_path: str) -> str:
    """Return ``root_path``, or the working directory if ``root_path`` is a site-packages directory."""
    if os.path.realpath(root_path) in _site_packages_dirs():
        return os.getcwd()
    return root_path


def _patch_parse_options() -> None:
    from basicsr.utils import options

    original = options.parse_options
    if getattr(original, '_wbsr_wrapped', False):
        return

    def parse_options(root_path, is_train=True):
        fixed = fixed_root_path(root_path)
        if fixed != root_path:
            print(f'wbsr: BasicSR root path {root_path} is site-packages; writing under {fixed} instead.',
                  file=sys.stderr)
        return original(fixed, is_train=is_train)

    parse_options._wbsr_wrapped = True
    parse_options.__doc__ = original.__doc__
    options.parse_options = parse_options


def _after_basicsr_import() -> None:
    try:
        _patch_parse_options()
        register_all()
    except Exception as exc:  # a broken plugin must not break BasicSR itself
        warnings.warn(f'WBSR plugin could not register its types in BasicSR: {exc!r}', RuntimeWarning)


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps BasicSR's loader: alias torchvision first, register the plugin after BasicSR is loaded."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        prepare_basicsr_import()
        self._loader.exec_module(module)
        _after_basicsr_import()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _BasicsrFinder(importlib.abc.MetaPathFinder):
    """Finds ``basicsr`` through the other finders and wraps its loader; removes itself once used."""

    def find_spec(self, fullname, path, target=None):
        if fullname != 'basicsr':
            return None
        _remove_finder()
        spec = importlib.util.find_spec('basicsr')
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BasicsrFinder)]


def install() -> None:
    """Arm the import hook (called from the ``.pth`` file at interpreter start)."""
    if hook_disabled():
        return
    if 'basicsr' in sys.modules:  # already imported before site ran us: register now
        _after_basicsr_import()
        return
    _remove_finder()
    sys.meta_path.insert(0, _BasicsrFinder())
