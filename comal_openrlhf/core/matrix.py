"""The finite preference game's file format, validated in one place (the game lab, the demo, the ``table`` judge
and the exact evaluation all read it).

    {"P": [[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]], "labels": ["a", "b", "c"]}

P[i][j] = P(labels[i] beats labels[j]) with every entry in [0, 1] and P + P^T = 1 (a general preference, arXiv
2410.23223: not necessarily transitive). ``"paper"`` names the paper's 3x3 synthetic game: P(b > a) = 0.9,
P(c > b) = 0.9, P(a > c) = 0.8, a cycle whose Nash policy is (4/11, 3/11, 4/11).
"""

import json

import numpy as np

from comal_openrlhf.errors import BadInputError

SYMMETRY_TOLERANCE = 1e-6
PAPER_LABELS = ("a", "b", "c")
PAPER_P = ((0.5, 0.1, 0.8), (0.9, 0.5, 0.1), (0.2, 0.9, 0.5))


class MatrixError(BadInputError):
    """A preference matrix (or its file) that cannot be used; the message names the file and the bad entry."""


def validate_matrix(P, labels=None, source="matrix"):
    """(P as float64 [n, n], labels as list[str]); MatrixError naming the bad entry otherwise."""
    try:
        P = np.asarray(P, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MatrixError(f"{source}: P must be a square list of lists of numbers ({e})") from None
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 1:
        raise MatrixError(f"{source}: P must be a non-empty square matrix, got shape {P.shape}")
    n = P.shape[0]
    for i in range(n):
        for j in range(n):
            if not (np.isfinite(P[i, j]) and 0.0 <= P[i, j] <= 1.0):
                raise MatrixError(
                    f"{source}: P[{i}][{j}] = {P[i, j]} (entry ({i}, {j})) is not a probability in [0, 1]"
                )
            if abs(P[i, j] + P[j, i] - 1.0) > SYMMETRY_TOLERANCE:
                raise MatrixError(
                    f"{source}: P[{i}][{j}] + P[{j}][{i}] = {P[i, j] + P[j, i]}: entry ({i}, {j}) breaks P + P^T = 1 "
                    f"(tolerance {SYMMETRY_TOLERANCE})"
                )
    labels = [str(i) for i in range(n)] if labels is None else labels
    if not isinstance(labels, (list, tuple)) or len(labels) != n:
        count = len(labels) if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise MatrixError(f"{source}: {count} labels for a {n}x{n} matrix (labels must be a list of {n} names)")
    for k, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip() or label != label.strip():
            raise MatrixError(f"{source}: label {k} ({label!r}) must be a non-empty string without outer spaces")
    if len(set(labels)) != n:
        raise MatrixError(f"{source}: labels are not unique: {list(labels)}")
    return P, list(labels)


def load_matrix(spec):
    """``"paper"`` or a JSON file path -> (P, labels), validated. Raises MatrixError."""
    if spec == "paper":
        return validate_matrix(PAPER_P, PAPER_LABELS, "paper game")
    try:
        with open(spec) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MatrixError(f"{spec}: no such matrix file") from None
    except (OSError, ValueError) as e:
        raise MatrixError(f"{spec}: cannot read JSON ({e})") from None
    if not isinstance(data, dict) or "P" not in data:
        raise MatrixError(f"{spec}: expected a JSON object with a 'P' matrix (and \"labels\")")
    return validate_matrix(data["P"], data.get("labels"), spec)
