"""Fusing several teachers' opinions into one distribution over the ontology (K classes + "other").

Every strategy takes each teacher's probabilities already projected onto ontology columns (``(N, K+1)``, column
K = other) together with its *coverage* — which columns it can say at all. Coverage matters with domain
experts: a plant expert has no opinion on cats, and averaging its "other" with the animal expert's "cat" would
drown every class in "other".

* ``vote``: each teacher votes its top column; a vote for "other" abstains. The winner's probability is the
  mean score its voters gave it; "other" takes what is left. No voter: the mean distribution.
* ``weighted``: per column, the weighted mean over the teachers that cover it (weights from params or fitted on
  labeled crops), renormalised. With teachers that all cover everything this is the plain weighted average.
* ``product``: a weighted product of experts (log-linear pooling). A teacher's "other" means "not one of mine",
  so it is its answer for every column it does not cover as well: a teacher then weighs equally on the classes
  outside its domain and on "other", and only the experts that know a class decide between that class and "other".
  Under ``weighted`` every expert's "not mine" lands on "other" (a cat crop: four experts out of five say "other"),
  one of the two reasons it calls a quarter of the animals "other" (README, where the labels lose objects). It
  trusts each expert's rejection instead: a weak rejector turns distractors into its classes.
* ``stacked``: a multinomial logistic regression on the concatenated teacher outputs, trained on labeled crops
  (the human seed plus "other" examples). Stored as JSON (coefficients, classes): no pickle.

Then, optionally, **calibration**: one temperature ``T`` fitted on the same labeled crops (negative log-likelihood),
applied as ``softmax(log p / T)``. It keeps every box's top class and makes the top probability mean the same
under every strategy: a weighted mean over experts that each see a fifth of the classes tops out near 0.5 even
when it is right, so thresholds on the confidence (review, the quality stage's floor) would mean a different
thing for each strategy without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wanwu.ontology import OTHER_ID

STRATEGIES = ("vote", "weighted", "product", "stacked")


class FusionError(ValueError):
    """Fusion cannot run as configured; names the strategy or file and the fix."""


def ids_to_columns(ids: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids >= 0, ids, k)


def columns_to_ids(cols: np.ndarray, k: int) -> np.ndarray:
    return np.where(cols >= k, OTHER_ID, cols).astype(np.int32)


def vote(probs: Sequence[np.ndarray], coverage: Sequence[np.ndarray]) -> np.ndarray:
    n, c = probs[0].shape
    k = c - 1
    votes = np.stack([p.argmax(1) for p in probs], axis=1)  # (N, T)
    stacked = np.stack(probs, axis=1)  # (N, T, C)
    out = np.zeros((n, c), np.float32)
    voters = (votes != k).sum(1)
    for col in range(k):
        mask = votes == col  # (N, T)
        if not mask.any():
            continue
        score = (stacked[:, :, col] * mask).sum(1)
        out[:, col] = np.where(voters > 0, score / np.maximum(voters, 1), 0.0)
    out[:, k] = np.clip(1.0 - out[:, :k].sum(1), 0.0, 1.0)
    none = voters == 0
    if none.any():
        out[none] = stacked[none].mean(1)
    return out / out.sum(1, keepdims=True)


def weighted(probs: Sequence[np.ndarray], coverage: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    cov = np.stack([np.asarray(c, bool) for c in coverage]).astype(np.float64)  # (T, C)
    num = sum(wi * p for wi, p in zip(w, probs, strict=True))
    den = (w[:, None] * cov).sum(0)
    out = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
    s = out.sum(1, keepdims=True)
    return (out / np.where(s > 0, s, 1.0)).astype(np.float32)


def product(probs: Sequence[np.ndarray], coverage: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``softmax(sum_t w_t log q_t)`` with ``q_t(c) = p_t(c)`` where teacher t covers c, else ``p_t(other)``.

    A teacher that cannot say "other" puts all its mass on its own classes; its silence on the others is then no
    opinion: they get ``1 / |its classes|``, the level of an average one of its own."""
    from scipy.special import softmax

    k = probs[0].shape[1] - 1
    logs = np.zeros(probs[0].shape, np.float64)
    for w, p, cov in zip(weights, probs, coverage, strict=True):
        cov = np.asarray(cov, bool)
        lp = _log(p)
        rest = lp[:, k : k + 1] if cov[k] else np.full((len(lp), 1), -np.log(max(int(cov.sum()), 1)))
        logs += w * np.where(cov[None, :], lp, rest)
    return softmax(logs, axis=1).astype(np.float32)


def rejection(probs: np.ndarray, coverage: np.ndarray, cols: np.ndarray) -> dict[str, float | None]:
    """How one opinion treats labeled crops (``cols``: column K = a distractor): of the objects of the classes it
    covers, the share named right and "other"; of the other objects and of the distractors, the share it rejects
    ("other"). An expert that cannot say "not mine" turns distractors and other domains into its classes."""
    k = probs.shape[1] - 1
    pred = np.asarray(probs).argmax(1)
    cov = np.asarray(coverage, bool)[cols]
    own, foreign, distractor = cov & (cols != k), ~cov, cols == k

    def share(mask: np.ndarray, hit: np.ndarray) -> float | None:
        return round(float(hit[mask].mean()), 4) if mask.any() else None

    return {
        "own_objects": int(own.sum()),
        "own_right": share(own, pred == cols),
        "own_other": share(own, pred == k),
        "foreign_rejected": share(foreign, pred == k),
        "distractors_rejected": share(distractor, pred == k),
    }


def fit_weights(probs: Sequence[np.ndarray], coverage: Sequence[np.ndarray], cols: np.ndarray) -> list[float]:
    """Each teacher's weight = its accuracy on the labeled crops it covers (floor 0.05)."""
    out = []
    for p, cov in zip(probs, coverage, strict=True):
        mask = np.asarray(cov, bool)[cols]
        acc = float((p[mask].argmax(1) == cols[mask]).mean()) if mask.any() else 0.0
        out.append(max(acc, 0.05))
    return out


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise: T < 1 sharpens, T > 1 flattens, the arg-max never moves."""
    if temperature == 1.0 or len(probs) == 0:
        return np.asarray(probs, np.float32)
    from scipy.special import softmax

    return softmax(_log(probs) / temperature, axis=1).astype(np.float32)


def fit_temperature(probs: np.ndarray, cols: np.ndarray) -> float:
    """The temperature (0.05–20) under which ``temper(probs, T)`` gives the labels ``cols`` the lowest mean negative
    log-likelihood: standard temperature scaling, fitted by a bounded scalar search."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logp, rows = _log(probs), np.arange(len(cols))
    res = minimize_scalar(
        lambda log_t: -log_softmax(logp / np.exp(log_t), axis=1)[rows, cols].mean(),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(res.x))


def calibration_error(probs: np.ndarray, cols: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top probability: the mean |accuracy − confidence| over equal-width
    confidence bins, weighted by their share of the crops."""
    if len(cols) == 0:
        return float("nan")
    conf = probs.max(1).astype(np.float64)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    gap = np.bincount(idx, probs.argmax(1) == cols, bins) - np.bincount(idx, conf, bins)
    return float(np.abs(gap).sum() / len(cols))


def describe_calibration(cal: dict[str, Any] | None) -> str | None:
    """One sentence on the fusion table's calibration record (console and run report), None when there was none."""
    if not cal or cal.get("temperature") in (None, 1.0):
        return None
    return (
        f"{cal['strategy']} fusion calibrated with T {cal['temperature']:.3f}: mean top probability "
        f"{cal['mean_confidence_before']:.2f} → {cal['mean_confidence_after']:.2f}, calibration error on the gold "
        f"crops {cal['ece_before']:.2f} → {cal['ece_after']:.2f}"
    )


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, np.float64), 1e-6, 1.0))


@contextlib.contextmanager
def _no_autolog() -> Iterator[None]:
    """ultralytics' MLflow callback switches on mlflow.autolog() for the whole process; a meta-model fit is not
    a run of its own (and autolog would pickle it)."""
    if "mlflow" not in sys.modules:
        yield
        return
    from mlflow.utils.autologging_utils import disable_autologging

    with disable_autologging():
        yield


class StackedModel:
    """Multinomial logistic regression over concatenated teacher outputs; predict_proba done with numpy."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, n_cols: int):
        self.coef = np.asarray(coef, np.float64)
        self.intercept = np.asarray(intercept, np.float64)
        self.classes = np.asarray(classes, np.int64)  # ontology columns the model saw (0..K)
        self.n_cols = n_cols

    @staticmethod
    def features(probs: Sequence[np.ndarray]) -> np.ndarray:
        # log-probabilities separate confident from hedged opinions better than raw probabilities
        return np.concatenate([np.log(np.clip(p, 1e-4, 1.0)) for p in probs], axis=1)

    @classmethod
    def fit(cls, probs: Sequence[np.ndarray], cols: np.ndarray, C: float = 1.0, seed: int = 0) -> StackedModel:
        from sklearn.linear_model import LogisticRegression

        n_cols = probs[0].shape[1]
        classes = np.unique(cols)
        if len(classes) < 2:
            raise FusionError(f"stacked fusion needs labeled crops of at least 2 classes, got {classes.tolist()}")
        lr = LogisticRegression(C=C, max_iter=2000, random_state=seed)
        with _no_autolog():
            lr.fit(cls.features(probs), cols)
        coef, intercept = lr.coef_, lr.intercept_
        if len(classes) == 2:  # sklearn stores one row for binary problems
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        return cls(coef, intercept, lr.classes_, n_cols)

    def predict_proba(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        from scipy.special import softmax

        p = softmax(self.features(probs) @ self.coef.T + self.intercept, axis=1)
        out = np.zeros((p.shape[0], self.n_cols), np.float32)
        out[:, self.classes] = p
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "classes": self.classes.tolist(),
            "n_cols": self.n_cols,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackedModel:
        return cls(np.array(d["coef"]), np.array(d["intercept"]), np.array(d["classes"]), int(d["n_cols"]))

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> StackedModel:
        if not Path(path).is_file():
            raise FusionError(f"{path}: no stacked meta-model. Run autolabel with fusion.strategy stacked to fit one.")
        return cls.from_dict(json.loads(Path(path).read_text()))


class Fusion:
    """One configured strategy: ``fusion(list of (N, K+1)) -> (N, K+1)``."""

    def __init__(
        self,
        strategy: str,
        coverage: Sequence[np.ndarray],
        weights: Sequence[float] | None = None,
        meta: StackedModel | None = None,
        temperature: float = 1.0,
    ):
        if strategy not in STRATEGIES:
            raise FusionError(f"fusion strategy {strategy!r}: choose one of {list(STRATEGIES)}")
        if strategy == "stacked" and meta is None:
            raise FusionError("fusion strategy stacked needs a fitted meta-model (StackedModel)")
        self.strategy = strategy
        self.coverage = [np.asarray(c, bool) for c in coverage]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.coverage)
        self.meta = meta
        if not temperature > 0:
            raise FusionError(f"fusion temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        return temper(self.raw(probs), self.temperature)

    def raw(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        """The strategy's output before calibration."""
        if len(probs) != len(self.coverage):
            raise FusionError(f"fusion configured for {len(self.coverage)} teachers, got {len(probs)} outputs")
        if len(probs) == 1 and self.strategy != "stacked":
            return np.asarray(probs[0], np.float32)
        if probs[0].shape[0] == 0:
            return np.zeros((0, probs[0].shape[1]), np.float32)
        if self.strategy == "vote":
            return vote(probs, self.coverage)
        if self.strategy == "weighted":
            return weighted(probs, self.coverage, self.weights)
        if self.strategy == "product":
            return product(probs, self.coverage, self.weights)
        assert self.meta is not None
        return self.meta.predict_proba(probs)

    def version(self) -> str:
        state = {
            "strategy": self.strategy,
            "weights": [round(w, 6) for w in self.weights],
            "coverage": [c.astype(int).tolist() for c in self.coverage],
            "meta": self.meta.to_dict() if self.meta is not None and self.strategy == "stacked" else None,
            "temperature": round(self.temperature, 6),
        }
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def accuracy(fused: np.ndarray, cols: np.ndarray) -> float:
    return float((fused.argmax(1) == cols).mean()) if len(cols) else float("nan")
