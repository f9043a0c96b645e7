"""Allocation rules: which subnet each region gets, from its difficulty, measured class errors or predicted errors.

Pure functions on arrays (``(n,)`` per region, ``(n, M)`` per region and subnet), so that the router, the benchmark
and the studies share one implementation of each rule.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def eq15_subnets(classes: np.ndarray, num_classes: int, num_subnets: int) -> np.ndarray:
    """Eq. 15: 0-based subnet ``ceil(k * M / K) - 1`` of classes ``k`` in 1..K."""
    k = np.asarray(classes, dtype=np.int64)
    return np.clip(-((-k * num_subnets) // num_classes) - 1, 0, num_subnets - 1)


def shifted_subnets(position: np.ndarray, lam: float, num_subnets: int) -> np.ndarray:
    """0-based subnet ``ceil((u + lam) * M) - 1``, clipped: monotone in ``u`` and in ``lam``."""
    return np.clip(np.ceil((np.asarray(position) + lam) * num_subnets - 1e-9).astype(np.int64) - 1, 0,
                   num_subnets - 1)


def budget_subnets(position: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Monotone allocation whose total cost is <= ``budget`` x the full network's (the largest shift that fits).

    ``costs`` is ``(M,)`` (every region the same size) or ``(n, M)`` (per region).
    """
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), (len(position), np.shape(costs)[-1]))
    limit = budget * costs[:, -1].sum() * (1 + 1e-12)
    m = costs.shape[1]
    rows = np.arange(len(position))

    def total(lam: float) -> float:
        return costs[rows, shifted_subnets(position, lam, m)].sum()

    lo, hi = -1.0, 1.0
    if total(lo) > limit:
        return shifted_subnets(position, lo, m)  # even all-smallest is over budget; caller warns
    if total(hi) <= limit:
        return shifted_subnets(position, hi, m)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= limit else (lo, mid)
    return shifted_subnets(position, lo, m)


def calibrated_subnets(classes: np.ndarray, position: np.ndarray, costs: np.ndarray, class_mse: np.ndarray,
                       area: np.ndarray, budget: float) -> np.ndarray:
    """Spend a FLOPs budget where it buys the most PSNR: greedy upgrades by marginal error removed per FLOP.

    An image's PSNR falls with its total squared error, so region ``i`` of class ``k`` is worth
    ``area_i * (class_mse[k - 1, 0] - class_mse[k - 1, m])`` (the squared error subnet ``m`` removes there,
    by the class's measured mean squared error per pixel) for ``costs[i, m]`` FLOPs. Every region starts on
    its cheapest subnet; then the upgrade with the largest gain per extra FLOP over all regions is taken, on the
    upper concave hull of each region's (cost, gain) points (so a subnet that buys less per FLOP than a larger
    one is skipped), until the next upgrade would exceed ``budget`` x the full network's total cost. Ties go to
    the harder region (larger ``position``), then to the earlier one. The allocation is deterministic, never
    exceeds the budget (unless all-cheapest already does) and grows with the budget: a larger budget takes a
    longer prefix of the same sequence of upgrades.
    """
    costs = np.asarray(costs, dtype=np.float64)
    n, m = costs.shape
    mse = np.asarray(class_mse, dtype=np.float64)[np.asarray(classes) - 1]
    value = np.asarray(area, dtype=np.float64)[:, None] * (mse[:, :1] - mse)
    steps = []  # (-ratio, -position, region, target subnet, extra cost)
    for i in range(n):
        hull, at = [], 0
        order = np.argsort(costs[i], kind='stable')
        at = order[0]
        while True:
            ahead = [j for j in order if costs[i, j] > costs[i, at]]
            if not ahead:
                break
            ratios = [(value[i, j] - value[i, at]) / (costs[i, j] - costs[i, at]) for j in ahead]
            best = int(np.argmax(ratios))
            if ratios[best] <= 0:
                break
            hull.append((ratios[best], ahead[best], costs[i, ahead[best]] - costs[i, at]))
            at = ahead[best]
        for ratio, target, extra in hull:
            steps.append((-ratio, -float(position[i]), i, int(target), float(extra)))
    chosen = np.array([int(np.argsort(costs[i], kind='stable')[0]) for i in range(n)], dtype=np.int64)
    spent = costs[np.arange(n), chosen].sum()
    limit = budget * costs[:, -1].sum() * (1 + 1e-12)
    # Each region's hull steps have falling ratios, so sorting all steps keeps every region's steps in order.
    for _, _, i, target, extra in sorted(steps):
        if spent + extra > limit:
            break
        chosen[i] = target
        spent += extra
    return chosen


def alpha_subnets(classes: np.ndarray, num_classes: int, costs: np.ndarray, alpha: float) -> np.ndarray:
    """Per region, the subnet whose cost is nearest ``alpha * (k / K) * C_full`` (``costs`` ``(M,)`` or ``(n, M)``)."""
    costs = np.broadcast_to(np.asarray(costs, dtype=np.float64), (len(classes), np.shape(costs)[-1]))
    target = alpha * np.asarray(classes, dtype=np.float64) / num_classes * costs[:, -1]
    return np.abs(costs - target[:, None]).argmin(axis=1)


def tradeoff_subnets(errors: np.ndarray, costs: np.ndarray, *, limit_cost: Optional[float] = None,
                     limit_error: Optional[float] = None) -> np.ndarray:
    """Per region, the subnet minimising ``errors + lam * costs`` (both ``(n, M)``), with one ``lam`` per image.

    With ``limit_cost``: the allocation of least total error whose total cost is at most ``limit_cost``; with
    ``limit_error``: the one of least total cost whose total error is at most ``limit_error``. ``lam`` is found by
    bisection (the totals are monotone in it); then the regions on which the two bracketing allocations differ are
    moved one at a time, best error-per-cost first, as far as the limit allows. Where no allocation meets the limit,
    the nearest one is returned (every region on its cheapest subnet for a cost limit, on its least-error subnet
    for an error limit); the caller reports it.
    """
    errors = np.asarray(errors, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if errors.shape != costs.shape or errors.ndim != 2:
        raise ValueError(f'errors and costs must be (n, M) arrays of one shape, got {errors.shape} and {costs.shape}')
    if (limit_cost is None) == (limit_error is None):
        raise ValueError('give exactly one of limit_cost and limit_error')
    rows = np.arange(len(errors))
    span_e = max(float(np.ptp(errors, axis=1).max(initial=0.)), 1e-300)
    span_c = max(float(np.ptp(costs, axis=1).max(initial=0.)), 1e-300)

    def choose(lam: float) -> np.ndarray:
        # ties broken towards the cheaper subnet, then the lower index (argmin's first)
        score = errors + lam * costs + 1e-12 * span_e * costs / span_c
        return score.argmin(axis=1)

    def fits(chosen: np.ndarray) -> bool:
        if limit_cost is not None:
            return costs[rows, chosen].sum() <= limit_cost * (1 + 1e-12)
        return errors[rows, chosen].sum() <= limit_error * (1 + 1e-12)

    # lam in [0, hi]: 0 gives the least error, hi (large enough) the least cost.
    gaps = np.diff(np.sort(costs, axis=1), axis=1)
    hi = 2 * span_e / float(gaps[gaps > 0].min(initial=span_c)) + 1.0  # above every error-per-cost trade
    lo = 0.0
    # the cost grows as lam falls; the error falls as lam falls
    if limit_cost is not None:
        if not fits(choose(hi)):
            return choose(hi)
        if fits(choose(lo)):
            return choose(lo)
    else:
        if not fits(choose(lo)):
            return choose(lo)
        if fits(choose(hi)):
            return choose(hi)
    feasible_at_high = limit_cost is not None  # for a cost limit, large lam is feasible; for an error limit, small
    for _ in range(100):
        mid = (lo + hi) / 2
        if fits(choose(mid)) == feasible_at_high:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    good, other = (choose(hi), choose(lo)) if feasible_at_high else (choose(lo), choose(hi))
    moves = np.flatnonzero(good != other)
    if len(moves):  # fill: take the other allocation's choices where they fit, best trade first
        d_err = errors[moves, good[moves]] - errors[moves, other[moves]]
        d_cost = costs[moves, other[moves]] - costs[moves, good[moves]]
        ratio = d_err / np.maximum(np.abs(d_cost), 1e-300) if feasible_at_high else \
            -d_cost / np.maximum(np.abs(d_err), 1e-300)
        for i in moves[np.argsort(-ratio, kind='stable')]:
            trial = good.copy()
            trial[i] = other[i]
            if fits(trial):
                good = trial
    return good


#: Largest number of majorise-minimise rounds of :func:`slope_subnets` (it stops earlier once the allocation repeats).
SLOPE_ROUNDS = 20


def slope_subnets(errors: np.ndarray, costs: np.ndarray, slope: float) -> np.ndarray:
    """Per region, the subnet that an upgrade is worth: every larger subnet whose extra cost buys at least ``slope``
    dB of the image's PSNR per 1% of the image's full-network cost, none that buys less.

    ``errors`` ``(n, M)`` is each region's squared error summed over its pixels, ``costs`` ``(n, M)`` its cost under
    every subnet. The image's loss against the full network, ``10 log10(E / E_full)`` with ``E`` the allocation's total
    error, plus ``slope`` x its cost in % of ``costs[:, -1].sum()``, is minimised: the logarithm is replaced by its
    tangent at the current allocation's ``E`` (an upper bound, as it is concave), which makes the choice one argmin per
    region, and the tangent is moved to the new allocation until it repeats (each round lowers the objective; at most
    :data:`SLOPE_ROUNDS`). This runs from two first tangents, at the full network's error and at the cheapest
    allocation's, and the better end is kept: a local minimum, which exhaustive search finds to be the global one in
    the tests. One slope for every image of a set spends its FLOPs where the set's mean PSNR gains most per FLOP: an
    image whose regions gain little gets fewer, unlike a per-image budget. Ties go to the cheaper subnet, then to the
    lower index.
    """
    errors = np.asarray(errors, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if errors.shape != costs.shape or errors.ndim != 2:
        raise ValueError(f'errors and costs must be (n, M) arrays of one shape, got {errors.shape} and {costs.shape}')
    if not (np.isfinite(slope) and slope > 0):
        raise ValueError(f'slope must be a finite number > 0, got {slope!r}')
    rows = np.arange(len(errors))
    full = float(errors[:, -1].sum())
    if full <= 0:  # no error anywhere: every subnet is as good as the full network
        return costs.argmin(axis=1)
    price = slope * 100. * costs / max(float(costs[:, -1].sum()), 1e-300)  # dB of cost of each choice
    span = max(float(np.ptp(costs, axis=1).max(initial=0.)), 1e-300)
    price = price + 1e-12 * costs / span  # ties towards the cheaper subnet

    def descend(total: float) -> np.ndarray:
        chosen = None
        for _ in range(SLOPE_ROUNDS):
            trial = (10. / np.log(10.) * errors / max(total, 1e-300) + price).argmin(axis=1)
            if chosen is not None and np.array_equal(trial, chosen):
                break
            chosen = trial
            total = float(errors[rows, chosen].sum())
        return chosen

    def objective(chosen: np.ndarray) -> float:
        return 10. * np.log10(max(float(errors[rows, chosen].sum()), 1e-300) / full) + float(price[rows, chosen].sum())

    # from the full network's error and from the cheapest allocation's: the two ends of the concave objective
    return min((descend(full), descend(float(errors[rows, costs.argmin(axis=1)].sum()))), key=objective)
