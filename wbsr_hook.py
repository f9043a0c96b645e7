"""Glue between the WBSR plugin and BasicSR.

Installed with a ``.pth`` file, :func:`install` runs at the start of every Python process of the
environment and arms two import hooks:

* **Registration** (switched off by ``WBSR_DISABLE_HOOK=1``): the first ``import basicsr`` in the
  process (``python -m basicsr.train``, ``basicsr/test.py`` from a checkout, a notebook) registers every
  WBSR type in BasicSR's registries, so option files can name them without an import line. Importing
  any ``wbsr_*`` package registers all four whatever the switch says.
* **The torchvision alias** (always armed; the switch does not touch it): ``basicsr.data.degradations``
  1.4.2 imports ``torchvision.transforms.functional_tensor``, which torchvision 0.17 removed. A finder at
  the end of ``sys.meta_path`` answers for that one module name, so it is consulted only when no real
  module exists, and provides an alias with the one function BasicSR uses (``rgb_to_grayscale``). A
  torchvision that still has the module, or a patched BasicSR that no longer imports it, is left alone.

Once BasicSR is imported, the registration also fixes where ``python -m basicsr.train`` writes: BasicSR
derives its root path from ``basicsr/train.py``'s own location, so an installed BasicSR would write
``experiments/`` and ``tb_logger/`` into site-packages. A root path that is a site-packages directory is
replaced by the current working directory, both in ``parse_options`` and when ``train.py`` sets
``opt['root_path']`` again afterwards (and the message says so).

This module is imported at start-up by every program of the environment (pip included), so it imports
nothing beyond ``os`` and ``sys``, which ``site`` has already loaded; everything else is imported when
used.
"""
import os
import sys

TYPE_CHECKING = False  # typing costs milliseconds to import: annotations below are strings
if TYPE_CHECKING:
    from typing import Any, Iterable

ENV_DISABLE = 'WBSR_DISABLE_HOOK'
PLUGIN_PACKAGES = ('wbsr_arch', 'wbsr_data', 'wbsr_losses', 'wbsr_models')
NAME_PREFIXES = ('WBSR', 'HES', 'BD')
_TV_FUNCTIONAL_TENSOR = 'torchvision.transforms.functional_tensor'


class RegistrationError(KeyError):
    """A WBSR type could not be registered in a BasicSR registry (name taken or badly prefixed)."""


def hook_disabled() -> bool:
    """Whether ``WBSR_DISABLE_HOOK`` switches the registration hook off (any value but '', 0, false, no)."""
    return os.environ.get(ENV_DISABLE, '').strip().lower() not in ('', '0', 'false', 'no')


# ---- the torchvision alias -------------------------------------------------------------------------------
class _TorchvisionAlias:
    """Finder and loader of ``torchvision.transforms.functional_tensor`` for torchvision >= 0.17.

    It sits at the end of ``sys.meta_path``, so it is asked only after every other finder failed to find
    the module, i.e. only where torchvision no longer ships it.
    """

    def find_spec(self, fullname: str, path: 'Any' = None, target: 'Any' = None) -> 'Any':
        if fullname != _TV_FUNCTIONAL_TENSOR:
            return None
        from importlib.machinery import ModuleSpec
        return ModuleSpec(fullname, self)

    def create_module(self, spec: 'Any') -> None:
        return None  # the default module object

    def exec_module(self, module: 'Any') -> None:
        from torchvision.transforms.functional import rgb_to_grayscale
        module.__doc__ = 'Alias installed by wbsr_hook: torchvision >= 0.17 removed this module.'
        module.rgb_to_grayscale = rgb_to_grayscale


def prepare_basicsr_import() -> None:
    """Make ``import basicsr`` work on a current torchvision (see the module docstring); idempotent."""
    if not any(isinstance(f, _TorchvisionAlias) for f in sys.meta_path):
        sys.meta_path.append(_TorchvisionAlias())


# ---- registration ----------------------------------------------------------------------------------------
def register(registry: 'Any', objects: 'Iterable[type]') -> None:
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
    import importlib
    for name in PLUGIN_PACKAGES:
        importlib.import_module(name)


# ---- where `python -m basicsr.train` writes ---------------------------------------------------------------
def _site_packages_dirs() -> set[str]:
    import site
    import sysconfig
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


def _guard_root_path(opt: 'Any') -> 'Any':
    """A copy of BasicSR's option dict whose ``root_path`` is never a site-packages directory.

    BasicSR's ``train.py`` sets ``opt['root_path'] = root_path`` again after ``parse_options`` returns (line
    94 in 1.4.2); in this dict that assignment goes through :func:`fixed_root_path` too, so ``tb_logger/``
    follows ``experiments/``. It is a subclass of the dict's own type with only ``__setitem__`` changed;
    copies and pickles of it are plain dicts of that type.
    """
    base = type(opt)
    guarded = _GUARDED_TYPES.get(base)
    if guarded is None:
        def __setitem__(self, key, value):
            if key == 'root_path' and isinstance(value, str):
                value = fixed_root_path(value)
            base.__setitem__(self, key, value)

        def __reduce__(self):
            return base, (), None, None, iter(self.items())

        guarded = type(base.__name__, (base, ), {'__setitem__': __setitem__, '__reduce__': __reduce__})
        _GUARDED_TYPES[base] = guarded
    result = guarded()
    result.update(opt)
    return result


_GUARDED_TYPES: dict[type, type] = {}


_checking = False  # script_parse_options calls parse_options again: that call is BasicSR's own


def _checked(function: 'Any', *args: 'Any') -> 'Any':
    global _checking
    _checking = True
    try:
        return function(*args)
    finally:
        _checking = False


def basicsr_script() -> 'str | None':
    """``basicsr/train.py`` or ``basicsr/test.py`` when that is the program this process runs (``python -m
    basicsr.train`` or ``python basicsr/test.py`` from a checkout), else ``None``."""
    main = sys.modules.get('__main__')
    name = getattr(getattr(main, '__spec__', None), 'name', None)
    if name in ('basicsr.train', 'basicsr.test'):
        return name.replace('.', '/') + '.py'
    path = os.path.abspath(getattr(main, '__file__', None) or os.sep)
    folder, base = os.path.split(path)
    if os.path.basename(folder) == 'basicsr' and base in ('train.py', 'test.py'):
        return f'basicsr/{base}'
    return None


def _patch_parse_options() -> None:
    from basicsr.utils import options

    original = options.parse_options
    if getattr(original, '_wbsr_wrapped', False):
        return

    def parse_options(root_path, is_train=True):
        fixed = fixed_root_path(root_path)
        script = basicsr_script()
        if script and not _checking:  # BasicSR's train.py/test.py itself: wbsr-train's start-up checks
            from wbsr_models.runners import script_parse_options
            opt, args = _checked(script_parse_options, fixed, is_train, script)
        else:
            opt, args = original(fixed, is_train=is_train)
        if fixed != root_path:  # said once the options are accepted: a refused run writes nothing anywhere
            print(f'wbsr: BasicSR root path {root_path} is site-packages; writing experiments/, results/ and '
                  f'tb_logger/ under {fixed} instead.', file=sys.stderr)
        return _guard_root_path(opt), args

    parse_options._wbsr_wrapped = True
    parse_options.__doc__ = original.__doc__
    options.parse_options = parse_options


def _after_basicsr_import() -> None:
    import warnings
    # ``basicsr/__init__.py`` imports its own train and test modules, so ``python -m basicsr.train`` always makes
    # runpy warn that the module it runs was imported first; BasicSR's layout, not a problem of the run.
    warnings.filterwarnings('ignore', message=r"'basicsr\.(train|test)' found in sys\.modules", category=RuntimeWarning)
    try:
        _patch_parse_options()
        register_all()
    except Exception as exc:  # a broken plugin must not break BasicSR itself
        import warnings
        warnings.warn(f'WBSR plugin could not register its types in BasicSR: {exc!r}', RuntimeWarning)


class _RegisteringLoader:
    """Wraps BasicSR's loader: registers the plugin once BasicSR is loaded; everything else is BasicSR's."""

    def __init__(self, loader: 'Any') -> None:
        self._loader = loader

    def create_module(self, spec: 'Any') -> 'Any':
        return self._loader.create_module(spec)

    def exec_module(self, module: 'Any') -> None:
        self._loader.exec_module(module)
        _after_basicsr_import()

    def __getattr__(self, name: str) -> 'Any':
        return getattr(self._loader, name)


class _BasicsrFinder:
    """Finds ``basicsr`` through the other finders and wraps its loader; removes itself once used."""

    def find_spec(self, fullname: str, path: 'Any' = None, target: 'Any' = None) -> 'Any':
        if fullname != 'basicsr':
            return None
        _remove_finder()
        from importlib.util import find_spec
        spec = find_spec('basicsr')
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BasicsrFinder)]


def install() -> None:
    """Arm the hooks (called from the ``.pth`` file at interpreter start): the alias always, registration
    unless ``WBSR_DISABLE_HOOK`` is set."""
    prepare_basicsr_import()
    if hook_disabled():
        return
    if 'basicsr' in sys.modules:  # already imported before site ran us: register now
        _after_basicsr_import()
        return
    _remove_finder()
    sys.meta_path.insert(0, _BasicsrFinder())
