"""Scaling-law fits: published Chinchilla estimates, recovery of known laws, determinism,
compute-optimal allocation and input validation.

The expensive fits are module-scoped fixtures so that each is done once.
"""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from dlstore.analysis.scaling import Fit, FitError, fit_chinchilla, fit_power_law
from dlstore.errors import DlstoreError

# a copy of ../shared/data/chinchilla (see its README there): the replication check runs on any
# clone, not only beside the shared folder
CHINCHILLA_CSV = Path(__file__).parent / "data" / "chinchilla" / "svg_extracted_data.csv"

# Besiroglu et al. 2024 ("Chinchilla scaling: a replication attempt"), approach 3 on the data
# they extracted from Hoffmann et al.'s figure, five highest-loss runs left out.
PUBLISHED = {"E": 1.8172, "A": 477.84, "alpha": 0.3473, "B": 2143.86, "beta": 0.3672}

CHIN_TRUTH = {"E": 1.5, "A": 400.0, "alpha": 0.35, "B": 1500.0, "beta": 0.3}
POWER_TRUTH = {"E": 0.2, "A": 5.0, "alpha": 0.5}


def load_chinchilla() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) of the extracted Chinchilla runs without the five highest-loss ones."""
    with CHINCHILLA_CSV.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss, kind="stable")[:-5])
    return n[keep], c[keep] / (6.0 * n[keep]), loss[keep]


def chinchilla_data(n: int = 240, sigma: float = 0.01, seed: int = 1):
    """Points of the known law CHIN_TRUTH, log-uniform N and D, log-normal noise `sigma`."""
    rng = np.random.default_rng(seed)
    big_n = np.exp(rng.uniform(np.log(1e6), np.log(1e9), n))
    big_d = np.exp(rng.uniform(np.log(1e8), np.log(1e11), n))
    t = CHIN_TRUTH
    clean = t["E"] + t["A"] * big_n ** -t["alpha"] + t["B"] * big_d ** -t["beta"]
    return big_n, big_d, clean * np.exp(rng.normal(0.0, sigma, n))


def power_data(n: int = 60, sigma: float = 0.01, seed: int = 2):
    """Points of the known law POWER_TRUTH, log-uniform x, log-normal noise `sigma`."""
    rng = np.random.default_rng(seed)
    x = np.exp(rng.uniform(np.log(10.0), np.log(1e5), n))
    t = POWER_TRUTH
    return x, (t["E"] + t["A"] * x ** -t["alpha"]) * np.exp(rng.normal(0.0, sigma, n))


@pytest.fixture(scope="module")
def real_fit() -> Fit:
    n, d, loss = load_chinchilla()
    return fit_chinchilla(n, d, loss, n_bootstrap=0)


@pytest.fixture(scope="module")
def synth_chin_fit() -> Fit:
    return fit_chinchilla(*chinchilla_data(), n_bootstrap=200, seed=0)


@pytest.fixture(scope="module")
def synth_power_fit() -> Fit:
    return fit_power_law(*power_data(), n_bootstrap=200, seed=0)


# -- 1. published estimates ---------------------------------------------------------------------


def test_chinchilla_data_has_240_runs_after_dropping_outliers():
    n, d, loss = load_chinchilla()
    assert len(n) == len(d) == len(loss) == 240


def test_reproduces_besiroglu_approach3_estimates(real_fit):
    p = real_fit.params
    assert real_fit.kind == "chinchilla" and real_fit.n == 240
    assert abs(p["alpha"] - PUBLISHED["alpha"]) < 0.01
    assert abs(p["beta"] - PUBLISHED["beta"]) < 0.01
    assert abs(p["E"] - PUBLISHED["E"]) < 0.05
    # A and B trade off against alpha and beta along a flat valley; only their size is checked.
    assert 0.5 < p["A"] / PUBLISHED["A"] < 2.0
    assert 0.5 < p["B"] / PUBLISHED["B"] < 2.0
    assert real_fit.ci == {}


def test_real_fit_objective_is_sum_of_huber_losses(real_fit):
    n, d, loss = load_chinchilla()
    r = np.log(real_fit.predict(n, d)) - np.log(loss)
    delta = 1e-3
    huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    assert real_fit.objective == pytest.approx(huber.sum(), rel=1e-9)


@pytest.mark.slow
def test_fast_multistart_matches_lbfgs_from_every_grid_point(real_fit):
    """The batched ranking + polish finds the optimum that L-BFGS-B from all 4,500 grid points
    finds (the exhaustive run takes ~20-40 s)."""
    n, d, loss = load_chinchilla()
    slow = fit_chinchilla(n, d, loss, n_bootstrap=0, exhaustive=True)
    assert real_fit.objective <= slow.objective * (1 + 1e-9)
    for name, value in slow.params.items():
        assert real_fit.params[name] == pytest.approx(value, rel=1e-4)


# -- 2. recovery of a known law -------------------------------------------------------------


def test_chinchilla_recovers_known_law(synth_chin_fit):
    fit = synth_chin_fit
    assert set(fit.ci) == set(CHIN_TRUTH)
    for name, true in CHIN_TRUTH.items():
        lo, hi = fit.ci[name]
        assert lo <= fit.params[name] <= hi, name
        assert lo <= true <= hi, (name, true, fit.ci[name])
    assert fit.params["alpha"] == pytest.approx(CHIN_TRUTH["alpha"], abs=0.03)
    assert fit.params["beta"] == pytest.approx(CHIN_TRUTH["beta"], abs=0.03)
    assert fit.params["E"] == pytest.approx(CHIN_TRUTH["E"], rel=0.05)
    assert fit.params["A"] == pytest.approx(CHIN_TRUTH["A"], rel=0.5)
    assert fit.params["B"] == pytest.approx(CHIN_TRUTH["B"], rel=0.5)


def test_power_law_recovers_known_law(synth_power_fit):
    fit = synth_power_fit
    assert fit.kind == "power_law" and fit.n == 60
    assert set(fit.params) == set(POWER_TRUTH) == set(fit.ci)
    for name, true in POWER_TRUTH.items():
        lo, hi = fit.ci[name]
        assert lo <= true <= hi, (name, true, fit.ci[name])
    assert fit.params["alpha"] == pytest.approx(0.5, abs=0.03)
    assert fit.params["E"] == pytest.approx(0.2, rel=0.05)
    assert fit.params["A"] == pytest.approx(5.0, rel=0.2)


def test_noiseless_power_law_is_recovered_exactly():
    x = np.geomspace(1.0, 1e4, 30)
    fit = fit_power_law(x, 0.2 + 5.0 * x**-0.5, n_bootstrap=0)
    assert fit.objective < 1e-12
    for name, true in POWER_TRUTH.items():
        assert fit.params[name] == pytest.approx(true, rel=1e-3)


def test_wider_interval_at_higher_level():
    x, y = power_data(n=30, sigma=0.03)
    narrow = fit_power_law(x, y, ci_level=0.5, n_bootstrap=50, seed=3)
    wide = fit_power_law(x, y, ci_level=0.99, n_bootstrap=50, seed=3)
    for name in POWER_TRUTH:
        assert wide.ci[name][0] <= narrow.ci[name][0] <= narrow.ci[name][1] <= wide.ci[name][1]


def test_predict(synth_chin_fit, synth_power_fit):
    p = synth_chin_fit.params
    got = synth_chin_fit.predict([1e7, 1e8], [1e9, 1e10])
    want = p["E"] + p["A"] * np.array([1e7, 1e8]) ** -p["alpha"] \
        + p["B"] * np.array([1e9, 1e10]) ** -p["beta"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    q = synth_power_fit.params
    want = q["E"] + q["A"] * 100.0 ** -q["alpha"]
    np.testing.assert_allclose(synth_power_fit.predict(100.0), want)
    with pytest.raises(FitError, match="predict"):
        synth_chin_fit.predict([1e7])
    with pytest.raises(FitError, match="one resource"):
        synth_power_fit.predict([1.0], [2.0])


def test_to_dict_is_json_safe(synth_chin_fit, real_fit):
    for fit in (synth_chin_fit, real_fit):
        d = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
        assert d["kind"] == "chinchilla" and d["n"] == fit.n
        assert d["params"] == pytest.approx(fit.params)
        assert {k: tuple(v) for k, v in d["ci"].items()} == fit.ci


# -- 3. determinism -----------------------------------------------------------------------------


def test_same_input_and_seed_give_identical_fits():
    big_n, big_d, loss = chinchilla_data(n=80, sigma=0.02, seed=5)
    first = fit_chinchilla(big_n, big_d, loss, n_bootstrap=20, seed=7)
    second = fit_chinchilla(big_n.copy(), big_d.copy(), loss.copy(), n_bootstrap=20, seed=7)
    assert first == second
    assert first.to_dict() == second.to_dict()
    x, y = power_data(n=25, sigma=0.02)
    assert fit_power_law(x, y, n_bootstrap=20, seed=1) == fit_power_law(x, y, n_bootstrap=20,
                                                                       seed=1)


def test_seed_changes_only_the_intervals():
    x, y = power_data(n=25, sigma=0.02)
    a = fit_power_law(x, y, n_bootstrap=20, seed=1)
    b = fit_power_law(x, y, n_bootstrap=20, seed=2)
    assert a.params == b.params and a.objective == b.objective
    assert a.ci != b.ci


# -- 4. compute-optimal allocation --------------------------------------------------------------


def test_compute_optimal_satisfies_budget_and_minimises_loss(real_fit):
    compute = np.array([1e18, 1e21, 5.76e23])
    n_opt, d_opt = real_fit.compute_optimal(compute)
    np.testing.assert_allclose(6.0 * n_opt * d_opt, compute, rtol=1e-10)
    for c, n_star in zip(compute, n_opt):
        grid = np.geomspace(n_star / 100.0, n_star * 100.0, 200_001)  # ratio step ~1.00005
        loss = real_fit.predict(grid, c / (6.0 * grid))
        best = grid[np.argmin(loss)]
        assert best == pytest.approx(n_star, rel=1e-3)
        assert real_fit.predict(n_star, c / (6.0 * n_star)) <= loss.min() + 1e-12


def test_compute_optimal_exponents(real_fit):
    a, b = real_fit.compute_optimal_exponents
    assert a + b == pytest.approx(1.0)
    p = real_fit.params
    assert a == pytest.approx(p["beta"] / (p["alpha"] + p["beta"]))
    n_opt, d_opt = real_fit.compute_optimal(np.array([1e20, 1e22]))
    assert np.log(n_opt[1] / n_opt[0]) / np.log(100.0) == pytest.approx(a)
    assert np.log(d_opt[1] / d_opt[0]) / np.log(100.0) == pytest.approx(b)
    # Besiroglu et al. report a ~ 0.51 and b ~ 0.49 for these data
    assert a == pytest.approx(0.514, abs=0.02)


def test_compute_optimal_needs_chinchilla_fit(synth_power_fit, real_fit):
    with pytest.raises(FitError, match="chinchilla"):
        synth_power_fit.compute_optimal(1e20)
    with pytest.raises(FitError, match="chinchilla"):
        _ = synth_power_fit.compute_optimal_exponents
    with pytest.raises(FitError, match="positive"):
        real_fit.compute_optimal([1e20, -1.0])


# -- 5. bad input -------------------------------------------------------------------------------

GOOD_N = np.geomspace(1e6, 1e9, 8)
GOOD_D = np.geomspace(1e8, 1e11, 8)[::-1].copy()
GOOD_L = 2.0 + GOOD_N**-0.1


@pytest.mark.parametrize(("args", "message"), [
    ((GOOD_N, GOOD_D[:-1], GOOD_L), "different lengths"),
    ((GOOD_N, GOOD_D, np.where(np.arange(8) == 3, np.nan, GOOD_L)), "loss contains 1 NaN"),
    ((np.where(np.arange(8) == 0, np.inf, GOOD_N), GOOD_D, GOOD_L), "N contains 1 NaN or inf"),
    ((GOOD_N, np.where(np.arange(8) == 2, 0.0, GOOD_D), GOOD_L), "D must be positive"),
    ((GOOD_N, GOOD_D, -GOOD_L), "loss must be positive"),
    ((GOOD_N[:5], GOOD_D[:5], GOOD_L[:5]), "too few points.*5 given.*at least 6"),
    ((GOOD_N.reshape(2, 4), GOOD_D, GOOD_L), "N must be one-dimensional"),
    ((["a"] * 8, GOOD_D, GOOD_L), "N must be numeric"),
])
def test_chinchilla_bad_input(args, message):
    with pytest.raises(FitError, match=message):
        fit_chinchilla(*args, n_bootstrap=0)


@pytest.mark.parametrize(("x", "y", "message"), [
    ([1.0, 2.0, 3.0, 4.0], [1.0, 0.5, 0.4], "different lengths"),
    ([1.0, 2.0, 3.0], [1.0, 0.5, 0.4], "too few points.*3 given.*at least 4"),
    ([1.0, -2.0, 3.0, 4.0], [1.0, 0.5, 0.4, 0.3], "x must be positive"),
    ([1.0, 2.0, 3.0, 4.0], [1.0, 0.5, float("nan"), 0.3], "y contains 1 NaN"),
])
def test_power_law_bad_input(x, y, message):
    with pytest.raises(FitError, match=message):
        fit_power_law(x, y, n_bootstrap=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"ci_level": 1.0}, "ci_level"),
    ({"ci_level": 0.0}, "ci_level"),
    ({"n_bootstrap": -1}, "n_bootstrap"),
    ({"n_bootstrap": 2.5}, "n_bootstrap"),
    ({"delta": 0.0}, "delta"),
    ({"seed": "x"}, "seed"),
])
def test_bad_options(options, message):
    x = np.geomspace(1.0, 100.0, 6)
    with pytest.raises(FitError, match=message):
        fit_power_law(x, 1.0 + x**-0.5, **options)


def test_fit_error_is_a_dlstore_error():
    assert issubclass(FitError, DlstoreError)


def noise_data(seed: int):
    """Losses that do not depend on N or D at all."""
    rng = np.random.default_rng(seed)
    big_n = np.geomspace(1e6, 1e9, 30)
    return big_n, rng.permutation(np.geomspace(1e8, 1e11, 30)), rng.uniform(1.0, 3.0, 30)


def test_data_that_do_not_follow_the_law_still_give_json_safe_output():
    """Pure noise: some bootstrap refits send a coefficient to infinity; the interval end is
    then inf (None in JSON), never NaN, and nothing warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_chinchilla(*noise_data(4), n_bootstrap=20)
    assert not any(np.isnan(v) for pair in fit.ci.values() for v in pair)
    assert fit.ci["A"][1] == np.inf
    d = fit.to_dict()
    assert d["ci"]["A"][1] is None
    json.dumps(d, allow_nan=False)


def test_diverged_fit_raises():
    """A best optimum whose coefficients overflow a float is reported, not returned as inf."""
    with pytest.raises(FitError, match="diverged"):
        fit_chinchilla(*noise_data(0), n_bootstrap=0)
