"""Server-side evaluation's metrics: a held-out set's labels against the class scores a round's model gives.

- `accuracy`: the share of rows whose highest score is the label (argmax vs y; ties go to the lowest class, as
  NumPy's argmax does);
- `loss`: the mean cross-entropy, -mean(log p[y]) with p clipped to [1e-12, 1], reported only when the scores
  are probabilities (every row non-negative and summing to 1 within 1e-3, e.g. a Softmax output): on logits
  a loss would need a choice the task has not made.

`check_heldout` refuses a held-out set the scores cannot be compared with, naming the array. Pure: numpy, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from tether.common import errors

PROBABILITY_TOLERANCE = 1e-3
MIN_PROBABILITY = 1e-12


class EvaluationError(errors.FailedPrecondition):
    """Server-side evaluation cannot score a round; the message names the file or array at fault."""


def check_heldout(X: npt.NDArray[Any], y: npt.NDArray[Any], *, where: str) -> None:
    """X has one row per label; y holds non-negative integer labels."""
    if X.ndim < 1 or X.shape[0] == 0:
        raise EvaluationError(f"{where}: X must have at least one row, got shape {list(X.shape)}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise EvaluationError(f"{where}: y must be one label per row of X ({X.shape[0]}), got shape {list(y.shape)}")
    if y.dtype.kind not in "iu":
        raise EvaluationError(f"{where}: y must hold integer class labels, got {y.dtype}")
    if int(y.min()) < 0:
        raise EvaluationError(f"{where}: y holds a negative label ({int(y.min())})")


def score(scores: npt.NDArray[Any], y: npt.NDArray[Any], *, where: str) -> dict[str, float]:
    """`accuracy` (and `loss` when `scores` are probabilities) of class scores [rows, classes] against labels y."""
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise EvaluationError(
            f"{where}: the graph's output must be class scores of shape [{y.shape[0]}, classes], "
            f"got {list(scores.shape)}"
        )
    classes = scores.shape[1]
    if int(y.max()) >= classes:
        raise EvaluationError(f"{where}: label {int(y.max())} is beyond the graph's {classes} classes")
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise EvaluationError(f"{where}: the graph's output holds NaN or infinite values")
    out = {"accuracy": float((s.argmax(axis=1) == y).mean())}
    if (s >= 0).all() and np.allclose(s.sum(axis=1), 1.0, atol=PROBABILITY_TOLERANCE, rtol=0):
        p = np.clip(s[np.arange(y.shape[0]), y], MIN_PROBABILITY, 1.0)
        out["loss"] = float(-np.log(p).mean())
    return out
