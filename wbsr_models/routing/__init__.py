"""Routing: the registry of modes, the allocation rules, and what routing stores in a checkpoint.

- :mod:`.modes`: every routing mode as one registry entry (options, checks, needs, selection, benchmark sweep);
- :mod:`.allocation`: the allocation rules as functions on arrays;
- :mod:`.artefacts`: measured class errors and the error predictor, stored in the checkpoint's ``'wbsr'`` entry;
- :mod:`.predictor`: the per-region error predictor of the ``learned`` mode, its labels and its fitting;
- :mod:`.timing`: each subnet's seconds per pixel on this device (``cost: seconds``).
"""
from .allocation import (alpha_subnets, budget_subnets, calibrated_subnets, eq15_subnets, shifted_subnets,
                         tradeoff_subnets)
from .artefacts import ClassErrors, RoutingArtefacts
from .modes import MODES, OPTIONS, Option, RoutingMode, Selection, get_mode, register_mode
from .predictor import ErrorPredictor

__all__ = ['MODES', 'OPTIONS', 'Option', 'RoutingMode', 'Selection', 'get_mode', 'register_mode', 'ClassErrors',
           'RoutingArtefacts', 'ErrorPredictor', 'alpha_subnets', 'budget_subnets', 'calibrated_subnets',
           'eq15_subnets', 'shifted_subnets', 'tradeoff_subnets']
