"""The DFR protocol on embeddings (Kirichenko et al., reference code deep_feature_reweighting).

Tuning: split the held-out embeddings 50/50, balance one half by subsampling every group (or class)
to the smallest, standardise, fit L1 logistic regression (liblinear) for each C, pick C by the
worst-group accuracy on the other half. Final: average the fits on ``num_refits`` fresh balanced
subsamples of the whole held-out split, standardised by a scaler fit on ``scaler_x``. The result is
folded into one plain linear layer over the raw embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import sklearn
from packaging.version import Version
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from shortcut_lightning.errors import DataError, ModelError
from shortcut_lightning.methods.dfr.fit_pool import FitPool

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
CHUNK_ROWS = 4096  # rows made float64 at a time where a whole split is read (scaler, held-out scores)


@dataclass
class LinearHead:
    """``logits = x @ weight.T + bias`` over raw (unstandardised) embeddings, ``weight`` [K, d]."""

    weight: np.ndarray
    bias: np.ndarray
    c: float
    tuning: dict[Any, float] = field(default_factory=dict)  # setting (C, or AFR's (gamma, l2)) -> its score
    chosen: dict[str, float] = field(default_factory=dict)  # the tuned settings beside ``c``, by name
    zero_fraction: float = 0.0
    refit_zero_fraction: float = 0.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.weight.T + self.bias).argmax(1)


def balanced_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of a random subsample with every label value cut to the count of the rarest one."""
    values = np.unique(labels)
    rows = [rng.permutation(np.flatnonzero(labels == v)) for v in values]
    smallest = min(len(r) for r in rows)
    return np.sort(np.concatenate([r[:smallest] for r in rows]))


def check_balance_labels(labels: np.ndarray, names: Sequence[str], what: str, split: str) -> None:
    """Every present label needs 2+ samples: one per half of the tuning split."""
    counts = np.bincount(labels, minlength=len(names))
    for k, n in enumerate(counts):
        if 0 < n < 2:
            raise DataError(
                f"{what} {names[k]!r} has {n} sample in the {split} split; DFR balances by subsampling to the "
                f"smallest {what} and needs at least 2 per {what}: add samples or refit on another split"
            )


def worst_accuracy(pred: np.ndarray, target: np.ndarray, labels: np.ndarray) -> float:
    """Lowest accuracy over the label values present (groups or classes)."""
    return min(float((pred[labels == v] == target[labels == v]).mean()) for v in np.unique(labels))


# scikit-learn 1.8 deprecated ``penalty`` in favour of ``l1_ratio``; older releases lack the latter's meaning
L1 = {"l1_ratio": 1.0} if Version(sklearn.__version__) >= Version("1.8") else {"penalty": "l1"}


def l1_logistic_regression(c: float, seed: int, num_classes: int) -> LogisticRegression | OneVsRestClassifier:
    """L1 logistic regression with liblinear, one-vs-rest beyond two classes (as liblinear always did)."""
    model = LogisticRegression(C=c, solver="liblinear", random_state=seed, **L1)
    return model if num_classes <= 2 else OneVsRestClassifier(model)


def _fit_rows(
    c: float, seed: int, num_classes: int, rows: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_fit` on ``rows`` of ``x, y`` (module level: a :class:`FitPool` worker unpickles it)."""
    return _fit(c, seed, num_classes, x[rows], y[rows])


def _fit_standardised_rows(
    c: float,
    seed: int,
    num_classes: int,
    rows: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_fit` on ``rows`` of ``x`` standardised by ``mean``/``scale``: only the rows a fit uses are made
    float64 and standardised (``StandardScaler.transform``'s arithmetic, so the same numbers)."""
    return _fit(c, seed, num_classes, _standardise(x[rows], mean, scale), y[rows])


def _standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)  # a copy: the caller's rows stay as they are
    z -= mean
    z /= scale
    return z


def _fit_scaler(x: np.ndarray) -> StandardScaler:
    """``StandardScaler`` fit on ``x`` in float64 a chunk of rows at a time (the whole split is never copied)."""
    scaler = StandardScaler()
    for start in range(0, len(x), CHUNK_ROWS):
        scaler.partial_fit(x[start : start + CHUNK_ROWS].astype(np.float64))
    return scaler


def _fit(
    c: float, seed: int, num_classes: int, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(coef [K or 1, d], intercept) of a fit; ``K`` rows for one-vs-rest."""
    model = l1_logistic_regression(c, seed, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    if isinstance(model, OneVsRestClassifier):
        coef = np.concatenate([e.coef_ for e in model.estimators_])
        intercept = np.concatenate([e.intercept_ for e in model.estimators_])
    else:
        coef, intercept = model.coef_, model.intercept_
    _check_rows(coef, num_classes, np.unique(y))
    return coef, intercept


def _check_rows(coef: np.ndarray, num_classes: int, classes: np.ndarray) -> None:
    """A fit must give one row per class of the head (liblinear's one row for two classes aside): never a head
    whose K rows are one row broadcast, which scores every class alike."""
    rows_match = coef.shape[0] == num_classes or (num_classes == 2 and coef.shape[0] == 1)
    if not rows_match or classes.min() < 0 or classes.max() >= num_classes:
        raise ModelError(
            f"DFR's logistic regression gave {coef.shape[0]} coefficient row(s) for a {num_classes}-class head: "
            f"its data hold class(es) {', '.join(map(str, classes.tolist()))}; refit on data with every class "
            f"0..{num_classes - 1}"
        )


def _scores(
    fits: Sequence[tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    rows: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
) -> list[np.ndarray]:
    """The decision scores of every fit on ``rows`` of ``x`` standardised by ``mean``/``scale``, a chunk of rows
    at a time (``StandardScaler.transform``'s arithmetic, so the same numbers as on the whole)."""
    out: list[list[np.ndarray]] = [[] for _ in fits]
    for start in range(0, len(rows), CHUNK_ROWS):
        z = _standardise(x[rows[start : start + CHUNK_ROWS]], mean, scale)
        for k, (coef, intercept) in enumerate(fits):
            out[k].append(z @ coef.T + intercept)
    return [np.concatenate(parts) for parts in out]


def _predict(scores: np.ndarray) -> np.ndarray:
    return (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)


def _as_multiclass(
    coef: np.ndarray, intercept: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Binary liblinear gives one row (class 1 vs 0): split it into two symmetric logit rows."""
    if num_classes == 2 and coef.shape[0] == 1:
        return np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept


def fit_dfr(
    x: np.ndarray,
    y: np.ndarray,
    balance: np.ndarray,
    scaler_x: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float] = C_GRID,
    num_refits: int = 20,
    seed: int = 0,
    workers: int | None = 1,
) -> LinearHead:
    """Tune C, average ``num_refits`` balanced refits, fold the standardisation into the weights.

    Tuning, as in the reference: split ``x`` 50/50, balance one half by ``balance``, standardise, fit each C
    and score the worst-``balance``-label accuracy on the other half. The independent fits (each C, then each
    refit) run in ``workers`` processes (:class:`FitPool`; ``None``: every core); the head is the same for any ``workers``.

    ``x`` and ``scaler_x`` may be float32 (as embedded): only the rows a fit uses are made float64 and
    standardised, and the scaler and the held-out scores take a chunk of rows at a time, so the cost and
    memory grow with the balanced subsamples, not with copies of the split. A fit that gives a coefficient
    row count other than the head's classes (a class missing from ``y``) raises :class:`ModelError`.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    held, train = order[: len(x) // 2], order[len(x) // 2 :]
    train = train[balanced_indices(balance[train], rng)]
    x_train = x[train].astype(np.float64)
    tune_scaler = StandardScaler().fit(x_train)
    refit_rows = [balanced_indices(balance, rng) for _ in range(num_refits)]  # drawn before any fit
    scaler = _fit_scaler(scaler_x)
    arrays = [(tune_scaler.transform(x_train), y[train]), (x, y, scaler.mean_, scaler.scale_)]
    with FitPool(arrays, workers) as pool:
        every_row = np.arange(len(train))
        fits = pool.map([(partial(_fit_rows, float(c), seed, num_classes, every_row), 0) for c in c_grid])
        scores = _scores(fits, x, held, tune_scaler.mean_, tune_scaler.scale_)
        tuning = {
            float(c): worst_accuracy(_predict(s), y[held], balance[held])
            for c, s in zip(c_grid, scores, strict=True)
        }
        best = max(tuning, key=lambda c: tuning[c])  # ties go to the first, i.e. largest C of the grid
        refits = pool.map(
            [(partial(_fit_standardised_rows, best, seed, num_classes, rows), 1) for rows in refit_rows]
        )
    coefs, intercepts, zero = [], [], []
    for raw_coef, raw_intercept in refits:
        coef, intercept = _as_multiclass(raw_coef, raw_intercept, num_classes)
        coefs.append(coef)
        intercepts.append(intercept)
        zero.append(float((raw_coef == 0).mean()))
    coef, intercept = np.mean(coefs, axis=0), np.mean(intercepts, axis=0)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale
    bias = intercept - weight @ scaler.mean_
    return LinearHead(
        weight=weight,
        bias=bias,
        c=best,
        tuning=tuning,
        zero_fraction=float((coef == 0).all(axis=0).mean()),
        refit_zero_fraction=float(np.mean(zero)),
    )
