"""A judge read from a preference matrix over canonical responses (the tabular game of COMAL spec section 1).

File format (the game-lab format)::

    {"P": [[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]], "labels": ["a", "b", "c"]}

with P[i][j] = P(labels[i] beats labels[j]), every entry in [0, 1] and P + P^T = 1. ``"paper"`` names the 3x3
synthetic game of the paper (spec section 3): P(b>a) = 0.9, P(c>b) = 0.9, P(a>c) = 0.8.

A response is stripped and matched to a label. A response that is no label loses to every label (P = 0) and ties
another invalid response (0.5): a policy that leaves the game's support is always beaten.
"""

import json

import numpy as np

from .base import Judge, JudgeError

SYMMETRY_TOLERANCE = 1e-6
PAPER_LABELS = ("a", "b", "c")
PAPER_P = ((0.5, 0.1, 0.8), (0.9, 0.5, 0.1), (0.2, 0.9, 0.5))


def validate_table(P, labels, source="table"):
    """Return (P as float64 [n, n], labels as list[str]); JudgeError naming the bad entry otherwise."""
    try:
        P = np.asarray(P, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise JudgeError(f"{source}: P is not a numeric matrix: {e}") from e
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 1:
        raise JudgeError(f"{source}: P must be a non-empty square matrix, got shape {P.shape}")
    n = P.shape[0]
    for i in range(n):
        for j in range(n):
            if not (np.isfinite(P[i, j]) and 0.0 <= P[i, j] <= 1.0):
                raise JudgeError(f"{source}: P[{i}][{j}] = {P[i, j]} is not in [0, 1]")
            if abs(P[i, j] + P[j, i] - 1.0) > SYMMETRY_TOLERANCE:
                raise JudgeError(f"{source}: P[{i}][{j}] + P[{j}][{i}] = {P[i, j] + P[j, i]} != 1")
    labels = [str(i) for i in range(n)] if labels is None else list(labels)
    if len(labels) != n:
        raise JudgeError(f"{source}: {len(labels)} labels for a {n}x{n} matrix")
    for k, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip() or label != label.strip():
            raise JudgeError(f"{source}: label {k} ({label!r}) must be a non-empty string without outer spaces")
    if len(set(labels)) != n:
        raise JudgeError(f"{source}: labels are not unique: {labels}")
    return P, labels


def load_table(spec):
    """``"paper"`` or a JSON file path -> (P, labels), validated."""
    if spec == "paper":
        return validate_table(PAPER_P, PAPER_LABELS, "paper game")
    try:
        with open(spec) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise JudgeError(f"cannot read preference table {spec!r}: {e}") from e
    if not isinstance(data, dict) or "P" not in data:
        raise JudgeError(f"preference table {spec!r} must be a JSON object with a 'P' matrix (and 'labels')")
    return validate_table(data["P"], data.get("labels"), f"preference table {spec!r}")


class TableJudge(Judge):
    def __init__(self, P, labels, name="table"):
        self.P, self.labels = validate_table(P, labels, name)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.name = name

    @classmethod
    def load(cls, spec):
        P, labels = load_table(spec)
        return cls(P, labels, name=f"table:{spec}")

    def _index(self, response):
        return self.index.get(response.strip(), -1) if isinstance(response, str) else -1

    def _prob(self, prompts, a, b):
        out = np.empty(len(a), dtype=np.float64)
        for k, (x, y) in enumerate(zip(a, b)):
            i, j = self._index(x), self._index(y)
            if i >= 0 and j >= 0:
                out[k] = self.P[i, j]
            else:  # an invalid response loses to any label and ties another invalid one
                out[k] = 0.5 if i < 0 and j < 0 else float(i >= 0)
        return out
