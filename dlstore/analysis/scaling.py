"""Scaling-law fits for the final losses of a population of runs.

Two laws are supported:

* `fit_power_law`: L(x) = E + A * x**-alpha, one resource x (parameters, tokens, compute...).
* `fit_chinchilla`: L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022).

Both follow Hoffmann et al.'s "approach 3" as re-examined by Besiroglu et al. 2024, so that our
numbers are comparable with the published ones: the law is written in log space as a
log-sum-exp, log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b),
E = exp(e) (this keeps A, B, E positive and the objective smooth), the SUM of Huber losses
(delta 1e-3) of the log residuals is minimised (Huber rather than squared error so that a few
outlying runs do not drag the fit), with L-BFGS-B from every point of a fixed grid of starts,
keeping the best optimum (the objective has many local optima and flat valleys).

Speed. The Chinchilla grid has 4,500 starts; a plain loop of scipy calls from every start takes
about 36 s on 2 cores even with this module's vectorised objective (`exhaustive=True`). We keep
scipy's L-BFGS-B for the final answer but make the multi-start cheap in two stages:

1. *Rank*: all grid starts are descended together by a vectorised damped (saddle-free) Newton
   method with a per-start trust radius. The objective is a sum over points of a function of a
   few linear forms of the parameters, so the exact gradient and Hessian of every start come
   from a few whole-array operations and small matrix products. Every `prune_every` = 4
   iterations the worse half of the still-moving starts is dropped (successive halving) until
   `_RANK_KEEP` remain; starts that have converged stop too.
2. *Polish*: the `_N_POLISH` best distinct end points are each polished by scipy L-BFGS-B with
   the analytic gradient (`jac=True`), and the best optimum is kept.

On the Chinchilla data (240 points) this takes about 0.7 s on 2 cores and reaches the same
optimum as `exhaustive=True` (which skips stage 1 and runs L-BFGS-B from every grid point, i.e. the
procedure verbatim; a slow test compares the two). On synthetic laws the best ranked start is
already at the global optimum and dozens of starts reach it, so the pruning has a wide margin.
BLAS is limited to one thread during a fit (`_single_threaded_blas`, see there why).

Confidence intervals are percentile bootstrap intervals: points are resampled with replacement
(`n_bootstrap` times, a resample being a vector of per-point counts, i.e. a weighted objective)
and the law is refitted. A refit does NOT restart from the whole grid: it starts from the
full-data optimum, the other distinct local optima of the full-data fit (`_N_BOOTSTRAP_OPTIMA`
in all, usually just one) and the `_N_BOOTSTRAP_GRID` grid points whose descents ended lowest
on the full data; all resamples x starts are descended in one vectorised batch and each
resample's best end point is polished with L-BFGS-B. On the Chinchilla data these refits agree
with full multi-start fits of the resampled points to 1e-14 in objective; 200 resamples add
about 0.3 s. Quantiles of A, B and E are taken of a, b, e and exponentiated (see
`_Model.interval`).

Everything is deterministic: the same data, options and seed give bit-identical results.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from dlstore.errors import DlstoreError

try:  # installed with scikit-learn; optional, the fit is only slower without it
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = ["Fit", "FitError", "check_distinct", "fit_chinchilla", "fit_power_law", "fit_warnings"]


class FitError(DlstoreError):
    """The data or options given to a scaling-law fit cannot be fitted (bad values, too few
    points, wrong shapes, unknown options), or a fit was asked for something it cannot give."""


# ---------------------------------------------------------------------------------------------
# Model description


_EXPONENT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
_LOG_E_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
_LOG_COEF_GRID = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)

# Stage-1 and bootstrap settings. Chosen by measurement on the Chinchilla data (see module doc).
_RANK_ITERS = 40
_RANK_KEEP = 128
_N_POLISH = 24
_N_BOOTSTRAP_OPTIMA = 4  # the full-data optimum and up to 3 other distinct local optima
_N_BOOTSTRAP_GRID = 4
_BOOTSTRAP_ITERS = 30
# scipy L-BFGS-B options. The objective handed to scipy is divided by delta so that it is of
# order one (a sum of absolute log residuals); scipy's ftol is relative to max(|f|, 1), so on the
# raw objective (~1e-3) the default tolerances would stop far from the optimum.
_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 20}


@dataclass(frozen=True)
class _Model:
    """A law written as log L = LSE over terms; term k is theta[const_k] - theta[slope_k] * u_k
    where u_k is the log of the k-th resource, or just theta[const_k] for the irreducible term."""

    kind: str
    theta_names: tuple[str, ...]
    terms: tuple[tuple[int, int | None], ...]
    grid: tuple[tuple[float, ...], ...]

    @property
    def n_theta(self) -> int:
        return len(self.theta_names)

    def grid_starts(self) -> np.ndarray:
        """Every combination of the per-parameter grids, shape (n_starts, n_theta)."""
        return np.array(list(itertools.product(*self.grid)), dtype=float)

    def params(self, theta: np.ndarray) -> dict[str, float]:
        """User-facing parameters (E, A, alpha, ...) from the log-space vector."""
        out: dict[str, float] = {}
        for name, value in zip(self.theta_names, theta):
            if name in ("a", "b", "e"):
                out[name.upper()] = float(math.exp(value))
            else:
                out[name] = float(value)
        order = ("E", "A", "alpha", "B", "beta")
        return {key: out[key] for key in order if key in out}

    def interval(self, thetas: np.ndarray, low_q: float, high_q: float
                 ) -> dict[str, tuple[float, float]]:
        """Percentile interval of each user-facing parameter over rows of `thetas`.

        Quantiles are taken of the fitted log-space parameters (a, b, e) and then exponentiated,
        so that A, B, E get the same interval as on the scale they were fitted on; a resample
        whose fit ran off to a huge coefficient gives an infinite end rather than a NaN.
        """
        out: dict[str, tuple[float, float]] = {}
        for j, name in enumerate(self.theta_names):
            lo, hi = np.quantile(thetas[:, j], [low_q, high_q])
            if name in ("a", "b", "e"):
                with np.errstate(over="ignore"):
                    lo, hi = np.exp(lo), np.exp(hi)
                name = name.upper()
            out[name] = (float(lo), float(hi))
        return out


_POWER_LAW = _Model(
    kind="power_law",
    theta_names=("a", "alpha", "e"),
    terms=((0, 1), (2, None)),
    grid=(_LOG_COEF_GRID, _EXPONENT_GRID, _LOG_E_GRID),
)
_CHINCHILLA = _Model(
    kind="chinchilla",
    theta_names=("a", "alpha", "b", "beta", "e"),
    terms=((0, 1), (2, 3), (4, None)),
    grid=(_LOG_COEF_GRID, _EXPONENT_GRID, _LOG_COEF_GRID, _EXPONENT_GRID, _LOG_E_GRID),
)


# ---------------------------------------------------------------------------------------------
# Objective


class _Problem:
    """One data set in the form the objective needs.

    `u` has one row per term: the log resource for a power term, zeros for the constant term, so
    that all terms are theta[const] - slope * u with slope 0 for the constant term and the
    objective is a handful of whole-array operations.
    """

    def __init__(self, model: _Model, log_resources: Sequence[np.ndarray], log_loss: np.ndarray,
                 delta: float):
        self.model = model
        self.delta = delta
        self.log_loss = log_loss
        self.n = log_loss.shape[0]
        k = len(model.terms)
        self.u = np.zeros((k, self.n))
        it = iter(log_resources)
        for row, (_, slope) in enumerate(model.terms):
            if slope is not None:
                self.u[row] = next(it)
        self.const_idx = np.array([c for c, _ in model.terms])
        self.power_rows = np.array([k for k, (_, s) in enumerate(model.terms) if s is not None])
        self.slope_idx = np.array([s for _, s in model.terms if s is not None])

    # -- one parameter vector (scipy callback) ------------------------------------------------

    def value_grad(self, theta: np.ndarray, weights: np.ndarray | None = None,
                   scale: float = 1.0) -> tuple[float, np.ndarray]:
        """Sum of Huber losses of the log residuals (times `scale`) and its exact gradient."""
        consts = theta[self.const_idx]
        slopes = np.zeros(len(consts))
        slopes[self.power_rows] = theta[self.slope_idx]
        t = consts[:, None] - slopes[:, None] * self.u
        m = t.max(axis=0)
        ex = np.exp(t - m)
        z = ex.sum(axis=0)
        r = m + np.log(z) - self.log_loss
        hp = np.clip(r, -self.delta, self.delta)  # Huber derivative
        if weights is not None:
            hp_w = hp * weights
        else:
            hp_w = hp
        value = float(hp_w @ (r - 0.5 * hp)) * scale
        q = ex * (hp_w * scale / z)  # d value / d term, shape (k, n)
        grad = np.empty_like(theta)
        grad[self.const_idx] = q.sum(axis=1)
        grad[self.slope_idx] = -np.einsum("kn,kn->k", q[self.power_rows], self.u[self.power_rows])
        return value, grad

    # -- a batch of parameter vectors ---------------------------------------------------------

    def _batch_terms(self, thetas: np.ndarray) -> np.ndarray:
        consts = thetas[:, self.const_idx]
        slopes = np.zeros_like(consts)
        slopes[:, self.power_rows] = thetas[:, self.slope_idx]
        return consts[:, :, None] - slopes[:, :, None] * self.u[None]

    def batch_value(self, thetas: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Objective of every row of `thetas`; `weights` is (n,) or one row per theta."""
        t = self._batch_terms(thetas)
        m = t.max(axis=1)
        z = np.exp(t - m[:, None, :]).sum(axis=1)
        r = m + np.log(z) - self.log_loss
        hp = np.clip(r, -self.delta, self.delta)
        per_point = hp * (r - 0.5 * hp)
        if weights is not None:
            per_point = per_point * weights
        return per_point.sum(axis=1)

    def batch_value_grad_hess(self, thetas: np.ndarray, weights: np.ndarray | None = None
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Objective, gradient (S, P) and exact Hessian (S, P, P) of every row of `thetas`.

        Point i contributes h(s_i - y_i) with s_i = LSE(M_i theta), where row k of M_i is
        e_{const_k} - u_ki e_{slope_k}. With softmax weights w_i, grad s_i = M_i^T w_i and
        hess s_i = M_i^T (diag(w_i) - w_i w_i^T) M_i, so the Hessian of the objective is
        sum_i sum_{k,l} Q_ikl M_ik M_il^T with Q_ikl = (h'' - h') w_ik w_il + [k = l] h' w_ik.
        Each block M_ik M_il^T only involves 1, u_k, u_l and u_k u_l, so the whole Hessian is a
        few weighted sums over points, i.e. small matrix products; no (S, n, P, P) array.
        """
        s_count, p = thetas.shape
        t = self._batch_terms(thetas)
        m = t.max(axis=1)
        ex = np.exp(t - m[:, None, :])
        z = ex.sum(axis=1)
        r = m + np.log(z) - self.log_loss
        w = ex / z[:, None, :]  # (S, k, n) softmax weights
        hp = np.clip(r, -self.delta, self.delta)
        hpp = np.abs(r) <= self.delta
        per_point = hp * (r - 0.5 * hp)
        if weights is not None:
            per_point *= weights
            hp_w = hp * weights
            coef = weights * (hpp - hp)
        else:
            hp_w = hp
            coef = hpp - hp
        value = per_point.sum(axis=1)
        grad = np.zeros((s_count, p))
        hess = np.zeros((s_count, p, p))
        terms = self.model.terms
        ones = np.ones(self.n)
        for k, (ck, sk) in enumerate(terms):
            gk = hp_w * w[:, k]
            if sk is None:
                grad[:, ck] += gk.sum(axis=1)
            else:
                both = gk @ np.stack([ones, self.u[k]], axis=1)
                grad[:, ck] += both[:, 0]
                grad[:, sk] -= both[:, 1]
            for l_ in range(k, len(terms)):
                cl, sl = terms[l_]
                q = coef * w[:, k] * w[:, l_]
                if l_ == k:
                    q += gk
                uk, ul = self.u[k], self.u[l_]
                sums = q @ np.stack([ones, ul, uk, uk * ul], axis=1)
                blocks = [(ck, cl, sums[:, 0])]
                if sl is not None:
                    blocks.append((ck, sl, -sums[:, 1]))
                if sk is not None:
                    blocks.append((sk, cl, -sums[:, 2]))
                if sk is not None and sl is not None:
                    blocks.append((sk, sl, sums[:, 3]))
                for i, j, val in blocks:
                    hess[:, i, j] += val
                    if l_ != k:
                        hess[:, j, i] += val
        return value, grad, hess


# ---------------------------------------------------------------------------------------------
# Optimisers


def _batch_descend(problem: _Problem, thetas: np.ndarray, iters: int,
                   weights: np.ndarray | None = None, keep: int | None = None,
                   prune_every: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Descend every row of `thetas` at once; returns end points and their objectives.

    Saddle-free damped Newton: the step is -V |Lambda|^-1 V^T g (so that it is a descent step
    even where the Hessian is indefinite, as it is wherever a Huber residual is in its linear
    part), clipped to a per-start trust radius that doubles after a successful step and shrinks
    after a failed one. It is only used to find out which basin each start falls into; scipy's
    L-BFGS-B gives the final answer.

    With `keep`, every `prune_every` iterations the worse half of the still-active starts stops
    being descended (successive halving) until `keep` remain. The 4,500 Chinchilla starts
    collapse into few basins and dozens of them reach the best one, so this has a wide margin:
    on the Chinchilla data and on synthetic laws the best end point matched an unpruned descent
    (and, on the Chinchilla data, L-BFGS-B from every grid point) to 1e-17 in objective, at a
    seventh of the cost. A start also stops once its trust radius has collapsed (it has
    converged). Stopped starts keep their last point and objective.
    """
    thetas = thetas.copy()
    value, grad, hess = problem.batch_value_grad_hess(thetas, weights)
    radius = np.ones(len(thetas))
    active = np.arange(len(thetas))
    per_row = weights is not None and weights.ndim == 2
    for it in range(iters):
        if keep is not None and it > 0 and it % prune_every == 0 and len(active) > keep:
            n_keep = max(keep, len(active) // 2)
            active = active[np.argsort(value[active], kind="stable")[:n_keep]]
            active.sort()
        active = active[radius[active] > 1e-9]
        if len(active) == 0:
            break
        lam, vec = np.linalg.eigh(hess[active])
        abs_lam = np.abs(lam)
        damp = 1e-10 * abs_lam.max(axis=1, keepdims=True) + 1e-300
        coef = -np.einsum("spq,sp->sq", vec, grad[active]) / (abs_lam + damp)
        step = np.einsum("spq,sq->sp", vec, coef)
        norm = np.sqrt((step**2).sum(axis=1))
        step *= np.minimum(1.0, radius[active] / np.maximum(norm, 1e-300))[:, None]
        trial = thetas[active] + step
        w_act = weights[active] if per_row else weights
        trial_value = problem.batch_value(trial, w_act)
        ok = trial_value < value[active]
        radius[active] = np.where(ok, np.minimum(radius[active] * 2.0, 10.0),
                                  radius[active] * 0.25)
        if ok.any():
            idx = active[ok]
            thetas[idx] = trial[ok]
            v, g, h = problem.batch_value_grad_hess(thetas[idx], weights[idx] if per_row
                                                    else weights)
            value[idx], grad[idx], hess[idx] = v, g, h
    return thetas, value


def _lbfgs(problem: _Problem, theta0: np.ndarray, weights: np.ndarray | None = None
           ) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B with the analytic gradient from `theta0`; returns (theta, objective)."""
    scale = 1.0 / problem.delta
    res = minimize(problem.value_grad, theta0, args=(weights, scale), method="L-BFGS-B",
                   jac=True, options=_LBFGS_OPTIONS)
    theta = np.asarray(res.x, dtype=float)
    value, _ = problem.value_grad(theta, weights)
    return theta, value


def _distinct(thetas: np.ndarray, order: np.ndarray, limit: int, tol: float = 1e-3) -> list[int]:
    """The first `limit` indices of `order` whose points differ from all earlier kept ones."""
    kept: list[int] = []
    for i in order:
        if all(np.max(np.abs(thetas[i] - thetas[j])) > tol for j in kept):
            kept.append(int(i))
            if len(kept) == limit:
                break
    return kept


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class Fit:
    """A fitted scaling law.

    `params` holds E, A, alpha (and B, beta for "chinchilla"); `ci` maps each of them to a
    percentile-bootstrap interval at level `ci_level` (empty when `n_bootstrap` is 0);
    `objective` is the minimised sum of Huber losses of log residuals over the `n` points.
    """

    kind: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    objective: float
    n: int
    ci_level: float = 0.95
    n_bootstrap: int = 0
    delta: float = 1e-3

    def predict(self, x: ArrayLike, D: ArrayLike | None = None) -> np.ndarray:  # noqa: N803
        """Predicted loss: `predict(x)` for a power law, `predict(N, D)` for Chinchilla."""
        p = self.params
        x_arr = np.asarray(x, dtype=float)
        if self.kind == "power_law":
            if D is not None:
                raise FitError("a power-law fit takes one resource: predict(x), not predict(x, D)")
            return p["E"] + p["A"] * x_arr ** -p["alpha"]
        if D is None:
            raise FitError("a chinchilla fit needs both resources: predict(N, D)")
        d_arr = np.asarray(D, dtype=float)
        return p["E"] + p["A"] * x_arr ** -p["alpha"] + p["B"] * d_arr ** -p["beta"]

    def _require_chinchilla(self, what: str) -> None:
        if self.kind != "chinchilla":
            raise FitError(f"{what} needs a chinchilla fit (N and D), this is a {self.kind} fit")

    @property
    def compute_optimal_exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ~ C^a and D_opt ~ C^b: a = beta/(alpha+beta), b = alpha/(alpha+beta).
        """
        self._require_chinchilla("compute_optimal_exponents")
        alpha, beta = self.params["alpha"], self.params["beta"]
        return beta / (alpha + beta), alpha / (alpha + beta)

    def compute_optimal(self, C: ArrayLike) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
        """Loss-minimising (N_opt, D_opt) for compute C = 6 N D (closed form of Hoffmann et al.).

        Along 6 N D = C the loss is E + A N^-alpha + B (C / 6N)^-beta, minimised where
        alpha A N^-alpha = beta B D^-beta, i.e. N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
        G = (alpha A / (beta B))^(1 / (alpha + beta)).
        """
        self._require_chinchilla("compute_optimal")
        c = np.asarray(C, dtype=float)
        if not np.all(np.isfinite(c)) or np.any(c <= 0):
            raise FitError("compute C must be finite and positive")
        p = self.params
        alpha, beta = p["alpha"], p["beta"]
        if alpha <= 0 or beta <= 0:
            raise FitError("compute-optimal allocation needs alpha > 0 and beta > 0, got "
                           f"alpha={alpha:g}, beta={beta:g}")
        g = (alpha * p["A"] / (beta * p["B"])) ** (1.0 / (alpha + beta))
        a, b = self.compute_optimal_exponents
        return g * (c / 6.0) ** a, (c / 6.0) ** b / g

    def to_dict(self) -> dict:
        """JSON-safe summary: plain floats, [low, high] lists for intervals, and None for an
        infinite interval end (possible when resamples of data that hardly follow the law drive a
        coefficient off to infinity), since JSON has no infinity."""
        return {
            "kind": self.kind,
            "params": {k: _json_float(v) for k, v in self.params.items()},
            "ci": {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in self.ci.items()},
            "ci_level": float(self.ci_level),
            "n_bootstrap": int(self.n_bootstrap),
            "objective": float(self.objective),
            "n": int(self.n),
            "delta": float(self.delta),
        }


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Input checks


def _positive_array(name: str, values: ArrayLike) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise FitError(f"{name} must be numeric: {exc}") from exc
    if arr.ndim != 1:
        raise FitError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_values(arrays: dict[str, np.ndarray], n_params: int, kind: str) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise FitError(f"arrays have different lengths: {desc}")
    for name, arr in arrays.items():
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise FitError(f"{name} contains {bad} NaN or infinite value(s)")
        nonpos = int((arr <= 0).sum())
        if nonpos:
            raise FitError(f"{name} must be positive (the fit is in log space); "
                           f"{nonpos} value(s) are <= 0")
    n = next(iter(lengths.values()))
    if n < n_params + 1:
        raise FitError(f"too few points for a {kind} fit: {n} given, need at least "
                       f"{n_params + 1} for {n_params} parameters")


def _check_options(ci_level: float, n_bootstrap: int, seed: int, delta: float) -> None:
    if not (isinstance(ci_level, (int, float)) and 0.0 < ci_level < 1.0):
        raise FitError(f"ci_level must be in (0, 1), got {ci_level!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) \
            or n_bootstrap < 0:
        raise FitError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise FitError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise FitError(f"delta must be a positive number, got {delta!r}")


# ---------------------------------------------------------------------------------------------
# Driver


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run BLAS on one thread for the duration of a fit.

    scipy's L-BFGS-B makes thousands of BLAS calls on 5-vectors and our batched products are
    small; handing those to a BLAS thread pool costs far more than it saves. Measured on 2
    cores with OpenBLAS's default 2 threads vs 1: the fast Chinchilla fit 0.8-2.2 s vs 0.7 s,
    `exhaustive=True` 550 s vs 36 s (each L-BFGS-B call became ~100x slower).
    """
    if threadpool_limits is None:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _fit(model: _Model, resources: list[np.ndarray], loss: np.ndarray, *, ci_level: float,
         n_bootstrap: int, seed: int, delta: float, exhaustive: bool) -> Fit:
    problem = _Problem(model, [np.log(r) for r in resources], np.log(loss), float(delta))
    starts = model.grid_starts()
    if exhaustive:
        results = [_lbfgs(problem, s) for s in starts]
        grid_values = np.array([v for _, v in results])
    else:
        ends, grid_values = _batch_descend(problem, starts, _RANK_ITERS, keep=_RANK_KEEP)
        chosen = _distinct(ends, np.argsort(grid_values, kind="stable"), _N_POLISH)
        results = [_lbfgs(problem, ends[i]) for i in chosen]
    optima = np.array([th for th, _ in results])
    values = np.array([v for _, v in results])
    order = np.argsort(values, kind="stable")
    best = optima[order[0]]
    if not np.all(np.isfinite(best)) or np.any(np.abs(best) > 700.0):
        raise FitError(f"the {model.kind} fit diverged (log-space parameters {best.tolist()} "
                       "overflow); the data may not follow the law (e.g. loss is pure noise)")
    params = model.params(best)
    ci: dict[str, tuple[float, float]] = {}
    if n_bootstrap > 0:
        # Refit starts: the full-data optimum, the other distinct full-data local optima and the
        # grid points whose descents ended lowest on the full data.
        local = optima[_distinct(optima, order, _N_BOOTSTRAP_OPTIMA)]
        grid = starts[np.argsort(grid_values, kind="stable")[:_N_BOOTSTRAP_GRID]]
        boot = _bootstrap(problem, np.concatenate([local, grid]), n_bootstrap, seed)
        intervals = model.interval(boot, (1.0 - ci_level) / 2.0, (1.0 + ci_level) / 2.0)
        ci = {name: intervals[name] for name in params}
    return Fit(kind=model.kind, params=params, ci=ci, objective=float(values[order[0]]),
               n=problem.n, ci_level=float(ci_level), n_bootstrap=int(n_bootstrap),
               delta=float(delta))


def _bootstrap(problem: _Problem, starts: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """Refit on `n_bootstrap` resamples (drawn with `seed`); returns one optimum per row.

    A resample is a vector of per-point counts, i.e. a weighted objective, so all resamples x
    starts are descended in one batch; each resample's best end point is then polished with
    L-BFGS-B on its own weighted objective.
    """
    rng = np.random.default_rng(seed)
    n = problem.n
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    counts = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    k = len(starts)
    thetas = np.tile(starts, (n_bootstrap, 1))  # row b * k + j: start j on resample b
    weights = np.repeat(counts, k, axis=0)
    ends, values = _batch_descend(problem, thetas, _BOOTSTRAP_ITERS, weights)
    pick = np.argmin(values.reshape(n_bootstrap, k), axis=1)
    out = np.empty((n_bootstrap, problem.model.n_theta))
    for b in range(n_bootstrap):
        out[b], _ = _lbfgs(problem, ends[b * k + pick[b]], counts[b])
    return out


def fit_power_law(x: ArrayLike, y: ArrayLike, *, ci_level: float = 0.95, n_bootstrap: int = 200,
                  seed: int = 0, delta: float = 1e-3, exhaustive: bool = False) -> Fit:
    """Fit L(x) = E + A * x**-alpha to losses `y` at resource values `x`.

    Same procedure as `fit_chinchilla` with one power term (grid: alpha in {0, .5, .., 2},
    e in {-1, -.5, .., 1}, a in {0, 5, .., 25}). `n_bootstrap=0` skips the intervals.
    """
    _check_options(ci_level, n_bootstrap, seed, delta)
    xa, ya = _positive_array("x", x), _positive_array("y", y)
    _check_values({"x": xa, "y": ya}, _POWER_LAW.n_theta, "power_law")
    # overflow on the way is judged from the result (FitError, fit_warnings), not printed
    with _single_threaded_blas(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _fit(_POWER_LAW, [xa], ya, ci_level=ci_level, n_bootstrap=n_bootstrap,
                    seed=seed, delta=delta, exhaustive=exhaustive)


def fit_chinchilla(N: ArrayLike, D: ArrayLike, loss: ArrayLike, *,  # noqa: N803
                   ci_level: float = 0.95, n_bootstrap: int = 200, seed: int = 0,
                   delta: float = 1e-3, exhaustive: bool = False) -> Fit:
    """Fit L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022, approach 3).

    N is the parameter count and D the number of training tokens of each run. The sum of Huber
    losses (`delta`) of log residuals is minimised with L-BFGS-B from the best of the
    5*5*5*6*6 = 4,500 grid starts (see the module docstring for how the starts are made cheap;
    `exhaustive=True` runs L-BFGS-B from every start instead). `n_bootstrap=0` skips the
    intervals.
    """
    _check_options(ci_level, n_bootstrap, seed, delta)
    na, da, la = _positive_array("N", N), _positive_array("D", D), _positive_array("loss", loss)
    _check_values({"N": na, "D": da, "loss": la}, _CHINCHILLA.n_theta, "chinchilla")
    # overflow on the way is judged from the result (FitError, fit_warnings), not printed
    with _single_threaded_blas(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _fit(_CHINCHILLA, [na, da], la, ci_level=ci_level, n_bootstrap=n_bootstrap,
                    seed=seed, delta=delta, exhaustive=exhaustive)


# ---------------------------------------------------------------------------------------------
# Judging a fit

MIN_DISTINCT = 3  # values of a resource below which its exponent is not identified
_EXPONENT_AT_ZERO = 1e-3
_WIDEST_EXPONENT_INTERVAL = 10.0  # an exponent interval wider than this says nothing
_WIDEST_COEFFICIENT_RATIO = 1e6   # nor does a coefficient interval spanning more decades


def check_distinct(resources: dict[str, ArrayLike], kind: str) -> None:
    """FitError when a resource has too few distinct values for its exponent to mean
    anything (e.g. a Chinchilla fit of runs that all saw the same D)."""
    for name, values in resources.items():
        n = len(np.unique(np.asarray(values, dtype=float)))
        if n < MIN_DISTINCT:
            raise FitError(f"{name} takes {n} distinct value{'s' if n != 1 else ''}; a {kind} "
                           f"fit needs at least {MIN_DISTINCT} to say anything about its "
                           "exponent (select runs that vary it, or fit one variable with --x)")


def fit_warnings(fit: Fit) -> list[str]:
    """What makes a fit doubtful, one line each: an exponent that is negative (loss grows with
    the resource) or at the law's bound 0, an interval that is unbounded or spans too much."""
    warnings = []
    for name in ("alpha", "beta"):
        if name not in fit.params:
            continue
        value = fit.params[name]
        if value < -_EXPONENT_AT_ZERO:
            warnings.append(f"{name} = {value:.3g} is negative: loss grows with the resource, "
                            "so the law does not describe these points")
        elif value <= _EXPONENT_AT_ZERO:
            warnings.append(f"{name} = {value:.3g} is at the bound 0: the term is a constant, "
                            "the resource shows no effect")
    for name, (low, high) in fit.ci.items():
        exponent = name in ("alpha", "beta")
        unbounded = not (np.isfinite(low) and np.isfinite(high))
        wide = (high - low > _WIDEST_EXPONENT_INTERVAL if exponent
                else low > 0 and high / low > _WIDEST_COEFFICIENT_RATIO)
        if unbounded or wide:
            warnings.append(f"the {fit.ci_level:.0%} interval of {name} [{low:.3g}, {high:.3g}] "
                            "is unbounded: the points do not pin it down")
    return warnings
