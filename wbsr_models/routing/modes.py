"""Routing modes: which subnet each region of an image gets. One registry entry per mode.

A mode is a :class:`RoutingMode` subclass registered with :func:`register_mode`. It declares

- the routing options it reads (``required`` and ``optional``, names from :data:`OPTIONS`), which the option-file
  checks (``val.routing``), ``wbsr-infer``'s flags and the benchmark's rows are built from;
- what it needs from the checkpoint (``needs``: the difficulty ``projection``, measured ``class_errors``, an
  ``arm_table``, a ``predictor``), checked when a router is built, before any image;
- its selection (:meth:`RoutingMode.select`), or for whole-image modes the one subnet it runs;
- its benchmark sweep (:attr:`RoutingMode.sweep`).

So a new mode is one entry here plus its tests: ``Router``, ``RoutingOptions``, ``wbsr-infer --mode``, option files
through ``basicsr/test.py`` and the benchmark all take it from the registry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch

from .allocation import (alpha_subnets, budget_subnets, calibrated_subnets, eq15_subnets, slope_subnets,
                         tradeoff_subnets)

if TYPE_CHECKING:  # pragma: no cover
    from wbsr_models.regions import Regions
    from wbsr_models.router import Router


# ---- options ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """A mode-specific routing option: its key (``val.routing.<name>``, ``--<name with dashes>``), kind and help.

    Kinds: ``fraction`` (a real number in (0, 1]), ``positive`` (a finite real > 0), ``loss`` (a finite real >= 0, dB),
    ``index`` (an integer >= 0), ``path`` (a file), ``choice`` (one of ``choices``).
    """

    name: str
    kind: str
    help: str
    implies: Optional[str] = None  # the mode a command-line flag selects when --mode is not given
    default: Any = None  # what a mode that reads it uses when it is not given
    choices: tuple = ()

    @property
    def flag(self) -> str:
        return '--' + self.name.replace('_', '-')

    def check(self, value: Any, where: str) -> Any:
        """``value`` as this option's type; ``ValueError`` naming ``where`` otherwise."""
        key = f'{where}.{self.name}' if not where.startswith('--') else where
        if self.kind == 'path':
            if not isinstance(value, str) or not value:
                raise ValueError(f'{key} must be a file path, got {value!r}')
            return value
        if self.kind == 'choice':
            if value not in self.choices:
                raise ValueError(f'{key} must be one of {self.choices}, got {value!r}')
            return value
        if self.kind == 'index':
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f'{key} must be an integer >= 0, got {value!r}')
            return int(value)
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f'{key} must be a finite number, got {value!r}')
        value = float(value)
        if self.kind == 'fraction' and not 0. < value <= 1.:
            raise ValueError(f'{key} must be in (0, 1], got {value!r}')
        if self.kind == 'positive' and not value > 0:
            raise ValueError(f'{key} must be > 0, got {value!r}')
        if self.kind == 'loss' and not value >= 0:
            raise ValueError(f'{key} must be >= 0 (dB), got {value!r}')
        return value


#: Every mode-specific option, by name (a field of :class:`~wbsr_models.router.RoutingOptions` each).
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option('budget', 'fraction', 'the image\'s cost <= budget x the full network\'s on the same regions',
           implies='budget'),
    Option('max_loss', 'loss', 'quality target: the cheapest allocation whose predicted PSNR loss against the full '
           'network is at most this many dB', implies='learned'),
    Option('slope', 'positive', 'a region gets a larger subnet where that buys at least this many dB of the image\'s '
           'PSNR per 1% of its full-network cost; one slope for a whole set spends the FLOPs where its mean PSNR '
           'gains most (each image\'s cost then differs)', implies='calibrated'),
    Option('cost', 'choice', 'what a budget or a slope counts: flops, or seconds on this device (a per-tile time '
           'table measured once and cached)', default='flops', choices=('flops', 'seconds')),
    Option('level', 'choice', 'learned mode: each region\'s full-network error, which the predicted ratios of the '
           'subnets multiply: the predictor\'s own, or the measured mean of its difficulty class (the class errors of '
           'wbsr-calibrate)', default='predictor', choices=('predictor', 'classes')),
    Option('alpha', 'positive', 'alpha mode: per region the subnet nearest alpha * (k / K) * C_full', implies='alpha',
           default=1.0),
    Option('subnet', 'index', 'fixed mode: index into the network\'s subnets', implies='fixed'),
    Option('arm_lut', 'path', 'arm mode: ARM lookup-table file (built on the validation set, in-sample, if absent)'),
    Option('arm_eta', 'positive', 'arm mode: a subnet maximises eta * PSNR - cost share', default=1.0),
)}


def describe(options: Any) -> str:
    """How logs name a routing: ``learned (slope 0.004, level classes)``: the mode, then the options it was given in
    the order of :data:`OPTIONS` (``options``: a mapping, or anything with those attributes)."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name, None)
    given = ', '.join(f'{name} {get(name)}' for name in OPTIONS if get(name) is not None)
    return get('mode') + (f' ({given})' if given else '')


# ---- what a mode's selection sees ------------------------------------------------------------------------------
@dataclass
class Selection:
    """The regions of one image and what is known about them when a mode chooses their subnets."""

    router: 'Router'
    lq: torch.Tensor  # (1, C, H, W) the prepared LR image
    regions: 'Regions'
    classes: np.ndarray  # (n,) difficulty classes 1..K
    position: np.ndarray  # (n,) continuous difficulty in [0, 1]
    num_classes: int
    costs: np.ndarray  # (n, M) FLOPs of every subnet on every region
    extra: dict = field(default_factory=dict)  # what the mode reports about its choice (into RoutingResult.extra)

    @property
    def area(self) -> np.ndarray:
        return (self.regions.boxes[:, 2] * self.regions.boxes[:, 3]).astype(np.float64)

    def option(self, name: str) -> Any:
        """A routing option's value, or the option's default where it was not given."""
        value = getattr(self.router.options, name)
        return OPTIONS[name].default if value is None else value


# ---- the registry -------------------------------------------------------------------------------------------------
class RoutingMode:
    """A routing mode (subclass and :func:`register_mode` it).

    Class attributes:
        name: The mode's name (``val.routing.mode``, ``wbsr-infer --mode``).
        summary: One line for ``--help`` and the docs.
        required: Options that must be given.
        optional: Options it reads when given.
        needs: Checkpoint artefacts it cannot run without: ``projection``, ``class_errors``, ``arm_table``,
            ``predictor``.
        whole_image: Runs one subnet on the whole image (no regions, no scheme).
        title: How tables name the mode (default: its name).
        sweep: The benchmark's points under the ``tiles`` scheme: one dict of option values per point.
        patch_sweep: The same under the ``patches`` scheme (the papers' protocol; empty: not run there).
        quick: The few points of short runs (the GPU run, the demo).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    whole_image: ClassVar[bool] = False
    title: ClassVar[str] = ''
    sweep: ClassVar[tuple[dict, ...]] = ({},)
    patch_sweep: ClassVar[tuple[dict, ...]] = ()
    quick: ClassVar[tuple[dict, ...]] = ()

    @classmethod
    def reads(cls) -> tuple[str, ...]:
        return cls.required + cls.optional

    @classmethod
    def label(cls, point: dict) -> str:
        """Tables' name of a point of the sweep: ``budget 0.6``, ``learned max_loss 0.05``, ``Eq. 15``."""
        words = [cls.title or cls.name]
        if point.get('level', 'predictor') != 'predictor':
            words.append('(class level)')
        for key, value in point.items():
            if key in ('cost', 'level'):
                continue
            words.append(f'{value}' if key in ('budget', 'alpha', 'subnet', 'arm_eta') else f'{key} {value}')
        if point.get('cost', 'flops') != 'flops':
            words.append(f"({point['cost']})")
        return ' '.join(words)

    def check_options(self, options: Any, where: str) -> None:
        """Checks between this mode's options (each option alone is checked by :class:`Option`)."""

    def check_router(self, router: 'Router') -> None:
        """Checks against the network and the checkpoint, when a router is built (before any image)."""

    def select(self, selection: Selection) -> np.ndarray:
        """One subnet index per region."""
        raise NotImplementedError

    def whole_subnet(self, router: 'Router') -> int:
        """The subnet a whole-image mode runs."""
        raise NotImplementedError


MODES: dict[str, RoutingMode] = {}


def register_mode(cls: type[RoutingMode]) -> type[RoutingMode]:
    """Add a mode to :data:`MODES` (a class decorator); a name taken, or an option that does not exist, is refused."""
    if cls.name in MODES:
        raise ValueError(f'routing mode {cls.name!r} is registered already')
    unknown = [o for o in cls.reads() if o not in OPTIONS]
    if unknown:
        raise ValueError(f'routing mode {cls.name!r} reads unknown options {unknown}; known: {sorted(OPTIONS)}')
    MODES[cls.name] = cls()
    return cls


def get_mode(name: str, where: str = 'val.routing.mode') -> RoutingMode:
    if name not in MODES:
        raise ValueError(f'{where} must be one of {tuple(MODES)}, got {name!r}')
    return MODES[name]


def modes_reading(option: str) -> list[str]:
    return [name for name, mode in MODES.items() if option in mode.reads()]


def cheapest_share(router: 'Router') -> float:
    """The cheapest subnet's cost as a share of the full network's, on one region of the router's scheme."""
    opts = router.options
    side = opts.tile_size if opts.scheme == 'tiles' else opts.patch_size
    costs = router.costs((side, side))
    return float(costs[0] / costs[-1])


def check_budget_reachable(router: 'Router', budget: float, where: str = 'val.routing.budget') -> None:
    share = cheapest_share(router)
    if budget < share:
        raise ValueError(f'{where}={budget} is below the cheapest subnet\'s cost share {share:.3f}; no allocation can '
                         'meet it')


def check_class_table(router: 'Router') -> None:
    """``ValueError`` unless the checkpoint's class errors fit its network and its difficulty thresholds."""
    table = router.class_errors.class_mse
    if table.shape[1] != router.num_subnets:
        raise ValueError(f'the calibration has {table.shape[1]} subnets, the network has {router.num_subnets}')
    if table.shape[0] != router.projection.num_classes:
        raise ValueError(f'the calibration has {table.shape[0]} classes, the thresholds '
                         f'{router.projection.num_classes}')


def shown(name: str, where: str) -> str:
    """How an error about options checked at ``where`` names option ``name``: as a flag on the command line, else as
    its key."""
    return OPTIONS[name].flag if where.startswith('--') else name


def exactly_one(options: Any, names: tuple[str, ...], mode: str, where: str) -> None:
    """``ValueError`` unless exactly one of the options ``names`` is given (named as flags where ``where`` is one)."""
    given = [n for n in names if getattr(options, n, None) is not None]
    if len(given) != 1:
        shown_names = [shown(n, where) for n in names]
        raise ValueError(f'{where}: {mode} mode takes exactly one of {", ".join(shown_names[:-1])} and '
                         f'{shown_names[-1]}'
                         + (f', got {" and ".join(shown_names[names.index(n)] for n in given)}' if given else ''))


#: The slopes (dB per 1% of FLOPs) of the benchmark's sweeps: on the training pool's 290 images they span 32-69% of
#: the full network's FLOPs with the reference checkpoint's class errors.
SLOPE_SWEEP = (0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.01)


# ---- the modes ------------------------------------------------------------------------------------------------------
@register_mode
class Eq15Mode(RoutingMode):
    name = 'wbsr'
    title = 'Eq. 15'
    summary = 'Eq. 15: class k of K goes to subnet ceil(k * M / K) (the paper)'
    needs = ('projection',)
    patch_sweep = ({},)
    quick = ({},)

    def select(self, s: Selection) -> np.ndarray:
        return eq15_subnets(s.classes, s.num_classes, s.router.num_subnets)


@register_mode
class BudgetMode(RoutingMode):
    name = 'budget'
    summary = 'the paper\'s position rule under a FLOPs budget: monotone in difficulty'
    required = ('budget',)
    needs = ('projection',)
    sweep = tuple({'budget': b} for b in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    patch_sweep = tuple({'budget': b} for b in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    quick = ({'budget': 0.5}, {'budget': 0.7}, {'budget': 0.9})

    def check_router(self, router: 'Router') -> None:
        check_budget_reachable(router, router.options.budget)

    def select(self, s: Selection) -> np.ndarray:
        budget = float(s.option('budget'))
        subnets = budget_subnets(s.position, s.costs, budget)
        if s.costs[np.arange(len(subnets)), subnets].sum() > budget * s.costs[:, -1].sum() * (1 + 1e-9):
            s.router.warn_once(f'budget {budget} is below the cheapest subnet for this image\'s regions; every region '
                               'uses the cheapest subnet')
        return subnets


@register_mode
class CalibratedMode(RoutingMode):
    name = 'calibrated'
    summary = ('each class\'s measured error per subnet (wbsr-calibrate) spent where it falls most per FLOP: under a '
               'FLOPs budget per image, or at a slope (dB per 1% of FLOPs) for a whole set')
    optional = ('budget', 'slope', 'cost')
    needs = ('projection', 'class_errors')
    sweep = tuple({'budget': b} for b in (0.4, 0.5, 0.6, 0.7, 0.8)) + tuple({'slope': v} for v in SLOPE_SWEEP)
    quick = ({'budget': 0.6}, {'slope': 0.003})

    def check_options(self, options: Any, where: str) -> None:
        exactly_one(options, ('budget', 'slope'), self.name, where)

    def check_router(self, router: 'Router') -> None:
        check_class_table(router)
        if router.options.budget is not None:
            check_budget_reachable(router, router.options.budget)

    def select(self, s: Selection) -> np.ndarray:
        table = s.router.class_errors.class_mse
        costs = s.router.region_seconds(s.regions) if s.option('cost') == 'seconds' else s.costs
        if s.router.options.slope is not None:
            return slope_subnets(table[s.classes - 1] * s.area[:, None], costs, float(s.router.options.slope))
        return calibrated_subnets(s.classes, s.position, costs, table, s.area, float(s.option('budget')))


@register_mode
class AlphaMode(RoutingMode):
    name = 'alpha'
    summary = 'per region the subnet whose cost is nearest alpha * (k / K) * C_full (larger alpha: more quality)'
    optional = ('alpha',)
    needs = ('projection',)
    sweep = tuple({'alpha': a} for a in (0.5, 1.0, 2.0))

    def select(self, s: Selection) -> np.ndarray:
        return alpha_subnets(s.classes, s.num_classes, s.costs, float(s.option('alpha')))


@register_mode
class ArmMode(RoutingMode):
    name = 'arm'
    title = 'ARM eta'
    summary = 'ARM (ECCV 2022): an edge score mapped to each subnet\'s PSNR by a lookup table, argmax eta*PSNR - cost'
    optional = ('arm_lut', 'arm_eta')
    needs = ('arm_table',)
    sweep = tuple({'arm_eta': e} for e in (0.4, 1.0, 3.2))
    patch_sweep = tuple({'arm_eta': e} for e in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2))

    def select(self, s: Selection) -> np.ndarray:
        return s.router.arm_table.select(s.regions, s.costs, float(s.option('arm_eta')))


@register_mode
class LearnedMode(RoutingMode):
    name = 'learned'
    summary = ('every region\'s error under every subnet predicted from the image (wbsr-calibrate --predictor); per '
               'image the subnets that minimise the predicted error under a budget, the cheapest within --max-loss '
               'dB of the full network, or those worth their cost at a slope (dB per 1% of FLOPs)')
    optional = ('budget', 'max_loss', 'slope', 'cost', 'level')
    needs = ('predictor',)
    sweep = tuple({'budget': b} for b in (0.4, 0.45, 0.5, 0.55, 0.6, 0.7)) + \
        tuple({'max_loss': d} for d in (0.02, 0.05, 0.1)) + tuple({'slope': v} for v in SLOPE_SWEEP) + \
        tuple({'slope': v, 'level': 'classes'} for v in SLOPE_SWEEP)
    quick = ({'budget': 0.55}, {'max_loss': 0.05})

    def check_options(self, options: Any, where: str) -> None:
        exactly_one(options, ('budget', 'max_loss', 'slope'), self.name, where)
        if getattr(options, 'level', None) == 'classes' and getattr(options, 'max_loss', None) is not None:
            raise ValueError(f'{where}: {shown("level", where)} classes takes {shown("budget", where)} or '
                             f'{shown("slope", where)}, not {shown("max_loss", where)} (the quality target is mapped '
                             'on the predictor\'s own errors)')

    def check_router(self, router: 'Router') -> None:
        predictor = router.predictor
        if predictor.num_subnets != router.num_subnets:
            raise ValueError(f'the predictor is for {predictor.num_subnets} subnets, the network has '
                             f'{router.num_subnets}')
        if router.options.level == 'classes':
            if router.class_errors is None or router.projection is None:
                raise ValueError('val.routing.level classes needs difficulty thresholds and class errors in the '
                                 'checkpoint (wbsr-calibrate)')
            check_class_table(router)
        if router.options.budget is not None:
            check_budget_reachable(router, router.options.budget)

    def select(self, s: Selection) -> np.ndarray:
        router = s.router
        errors = router.predicted_errors(s.lq, s.regions)  # mean squared error per pixel
        if s.option('level') == 'classes':  # the predicted ratios times the class's measured full-network error
            errors = errors / errors[:, -1:] * router.class_errors.class_mse[s.classes - 1, -1:]
        errors = errors * s.area[:, None]  # squared error summed per region
        costs = router.region_seconds(s.regions) if s.option('cost') == 'seconds' else s.costs
        overhead = router.predictor_cost(s.regions, s.option('cost'))
        budget, max_loss, slope = router.options.budget, router.options.max_loss, router.options.slope
        if slope is not None:  # the predictor's own cost is the same for every allocation: it does not move the choice
            subnets = slope_subnets(errors, costs, float(slope))
        elif budget is not None:
            limit = budget * costs[:, -1].sum() - overhead  # the predictor's own cost comes out of the budget
            subnets = tradeoff_subnets(errors, costs, limit_cost=limit)
            if costs[np.arange(len(subnets)), subnets].sum() > limit * (1 + 1e-9):
                router.warn_once(f'budget {budget} leaves less than the cheapest subnets after the predictor\'s cost '
                                 'on an image; every region uses its cheapest subnet')
        else:  # the predicted-loss threshold that kept the requested loss on the held-out training images
            threshold = router.predictor.quality_threshold(float(max_loss))
            subnets = tradeoff_subnets(errors, costs, limit_error=errors[:, -1].sum() * 10 ** (threshold / 10))
        rows = np.arange(len(subnets))
        # the PSNR loss expected on this image against the full network (dB), what a quality target is checked by:
        # the predicted loss, read through the held-out images' measured losses where the predictor has them
        raw = float(10 * np.log10(errors[rows, subnets].sum() / errors[:, -1].sum()))
        s.extra['predicted_loss_db'] = router.predictor.quality_estimate(raw)
        return subnets


@register_mode
class FullMode(RoutingMode):
    name = 'full'
    summary = 'the largest subnet (the original network) on the whole image'
    whole_image = True

    def whole_subnet(self, router: 'Router') -> int:
        return router.num_subnets - 1


@register_mode
class FixedMode(RoutingMode):
    name = 'fixed'
    summary = 'one named subnet on the whole image'
    required = ('subnet',)
    whole_image = True
    sweep = ()  # the benchmark runs every subnet

    def check_router(self, router: 'Router') -> None:
        if not router.options.subnet < router.num_subnets:
            raise ValueError(f'val.routing.subnet={router.options.subnet} out of range 0..{router.num_subnets - 1}')

    def whole_subnet(self, router: 'Router') -> int:
        return int(router.options.subnet)
