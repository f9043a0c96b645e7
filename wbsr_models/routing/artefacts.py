"""What routing keeps in a checkpoint beside the weights: measured class errors, the error predictor and the default
routing.

All live in the checkpoint's ``'wbsr'`` entry under ``'routing'`` as plain numbers and tensors (no pickled objects):
``{'class_errors': {...}, 'predictor': {...}, 'default': {...}}``. The difficulty thresholds and projection, which
training (HES) makes and uses too, stay in ``'wbsr' -> 'difficulty'``. Checkpoints whose class errors were written
inside the difficulty entry (``class_mse``, ``calibration``) are read as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from .predictor import ErrorPredictor


@dataclass
class ClassErrors:
    """Every subnet's mean squared error per pixel (Y, [0, 1]) on every difficulty class, measured on training images
    by ``wbsr-calibrate`` (the ``calibrated`` mode).

    Attributes:
        class_mse: ``(K, M)`` table.
        info: How it was measured (scheme, region size, images, regions, data folder).
    """

    class_mse: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {'class_mse': [[float(v) for v in row] for row in self.class_mse], 'info': dict(self.info)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_classes: Optional[int] = None) -> 'ClassErrors':
        try:
            table = np.asarray(data['class_mse'], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f'the class errors are not a table of numbers ({exc})') from None
        if table.ndim != 2 or table.size == 0 or not np.all(np.isfinite(table)) or np.any(table < 0):
            raise ValueError(f'the class errors must be a finite, non-negative (K, M) table, got shape {table.shape}')
        if num_classes is not None and table.shape[0] != num_classes:
            raise ValueError(f'the class errors have {table.shape[0]} classes, the thresholds make {num_classes}: '
                             f'a (K={num_classes}, M) table is needed')
        info = data.get('info', data.get('calibration')) or {}
        return cls(class_mse=table, info=dict(info) if isinstance(info, Mapping) else {})


@dataclass
class DefaultRouting:
    """The routing a checkpoint runs when none is asked for (``val.routing.mode`` and ``wbsr-infer --mode`` not given),
    chosen by ``wbsr-calibrate --predictor`` on its held-out training images.

    Attributes:
        options: Routing options (``mode`` and the mode's options, e.g. ``{'mode': 'learned', 'level': 'classes',
            'slope': 0.004}``).
        info: How it was chosen (target loss, images, the loss and FLOPs share measured there).
    """

    options: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {'options': dict(self.options), 'info': dict(self.info)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'DefaultRouting':
        """The stored default; ``ValueError`` unless its options are valid routing options with a mode."""
        from wbsr_models.router import RoutingOptions

        from .modes import OPTIONS
        options = data.get('options') if isinstance(data, Mapping) else None
        if not isinstance(options, Mapping) or not options.get('mode'):
            raise ValueError('it has no routing options with a mode')
        other = sorted(set(options) - {'mode'} - set(OPTIONS))
        if other:
            raise ValueError(f'it sets {other}, which are not routing-mode options')
        RoutingOptions.from_opt(options, 'default')
        info = data.get('info') or {}
        return cls(options=dict(options), info=dict(info) if isinstance(info, Mapping) else {})

    def describe(self) -> str:
        """``learned (slope 0.004, level classes)``, as the router describes what it runs."""
        from .modes import describe
        return describe(self.options)


@dataclass
class RoutingArtefacts:
    """The routing entries of a checkpoint (each optional)."""

    class_errors: Optional[ClassErrors] = None
    predictor: Optional[ErrorPredictor] = None
    default: Optional[DefaultRouting] = None

    @property
    def usable_default(self) -> Optional[DefaultRouting]:
        """The stored default routing where the predictor it was chosen with is here too, else ``None``."""
        return self.default if self.predictor is not None else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.class_errors is not None:
            data['class_errors'] = self.class_errors.to_dict()
        if self.predictor is not None:
            data['predictor'] = self.predictor.to_dict(getattr(self.predictor, 'fit_info', None))
        if self.default is not None:
            data['default'] = self.default.to_dict()
        return data

    @classmethod
    def from_checkpoint_entry(cls, extras: Mapping[str, Any]) -> 'RoutingArtefacts':
        """The artefacts of a checkpoint's ``'wbsr'`` entry; ``ValueError`` naming the damaged one."""
        routing = extras.get('routing') or {}
        if not isinstance(routing, Mapping):
            raise ValueError("its 'routing' entry is not a mapping")
        difficulty = extras.get('difficulty') if isinstance(extras.get('difficulty'), Mapping) else {}
        num_classes = len(difficulty['thresholds']) + 1 if difficulty and 'thresholds' in difficulty else None
        artefacts = cls()
        source = routing.get('class_errors')
        if source is None and difficulty.get('class_mse') is not None:  # written inside the difficulty entry
            source = {'class_mse': difficulty['class_mse'], 'info': difficulty.get('calibration') or {}}
        if source is not None:
            if not isinstance(source, Mapping):
                raise ValueError('its class errors are not a mapping')
            try:
                artefacts.class_errors = ClassErrors.from_dict(source, num_classes)
            except ValueError as exc:
                raise ValueError(f'bad class errors ({exc})') from None
        if routing.get('predictor') is not None:
            try:
                artefacts.predictor = ErrorPredictor.from_dict(routing['predictor'])
            except ValueError as exc:
                raise ValueError(f'bad error predictor ({exc})') from None
        if routing.get('default') is not None:
            try:
                artefacts.default = DefaultRouting.from_dict(routing['default'])
            except ValueError as exc:
                raise ValueError(f'bad default routing ({exc})') from None
        return artefacts
