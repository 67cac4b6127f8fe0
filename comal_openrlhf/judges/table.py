"""A judge read from a preference matrix over canonical responses: the tabular game (file format and validation in
``comal_openrlhf.matrix``; ``"paper"`` names the paper's 3x3 synthetic game).

A response is stripped and matched to a label. A response that is no label loses to every label (P = 0) and ties
another invalid response (0.5): a policy that leaves the game's support is always beaten.
"""

import numpy as np

from comal_openrlhf.matrix import MatrixError, load_matrix, validate_matrix

from .base import Judge, JudgeError


def validate_table(P, labels, source="table"):
    """``matrix.validate_matrix`` with the judge's error type."""
    try:
        return validate_matrix(P, labels, source)
    except MatrixError as e:
        raise JudgeError(str(e)) from None


def load_table(spec):
    """``"paper"`` or a JSON file path -> (P, labels), validated; JudgeError naming the file and entry otherwise."""
    try:
        return load_matrix(spec)
    except MatrixError as e:
        raise JudgeError(f"preference table {e}") from None


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
