"""The one judge interface: P(a beats b | prompt), batched.

A judge is a general preference oracle (arXiv 2410.23223, section 1): it need not be Bradley-Terry or transitive.
Subclasses implement ``_prob``; the public ``prob`` checks inputs and outputs so that every kind (a user's Python
file, a remote server, a model) fails the same way: a ``JudgeError`` naming the judge.

``judge_pairs`` is what the COMAL loop calls (arXiv 2410.23223, section 5, step 2): it asks for both orders and
averages p(a, b) and 1 - p(b, a), which cancels a judge's position bias and makes the result antisymmetric. A judge
that is antisymmetric by construction (``antisymmetric = True``: a reward model's sigmoid of differences, a GPM's
skew-symmetric score) is asked one order only: the average would equal its single answer.

``TableJudge`` is the exact judge of a known preference matrix over canonical responses: the tabular game (file
format and validation in ``comal_openrlhf.core.matrix``; ``"paper"`` names the paper's 3x3 synthetic game). A
response is stripped and matched to a label; one that is no label loses to every label (P = 0) and ties another
invalid response (0.5): a policy that leaves the game's support is always beaten. It lives here, beside the
interface, because the pair builder and the game lab (this package) use it; the model judges are in
``comal_openrlhf.judges``.
"""

import numpy as np

from comal_openrlhf.core.matrix import MatrixError, load_matrix, validate_matrix
from comal_openrlhf.errors import JudgeError

PROB_TOLERANCE = 1e-6


def check_probs(name, p, n):
    """Return ``p`` as float64 of shape [n] clipped to [0, 1]; raise JudgeError naming the judge otherwise."""
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise JudgeError(f"judge {name!r} returned values that are not numbers: {e}") from e
    if arr.ndim != 1 or arr.shape[0] != n:
        raise JudgeError(f"judge {name!r} returned {arr.shape} probabilities, expected {n}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JudgeError(f"judge {name!r} returned a non-finite probability {arr[i]} at index {i}")
    out = (arr < -PROB_TOLERANCE) | (arr > 1 + PROB_TOLERANCE)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise JudgeError(f"judge {name!r} returned probability {arr[i]} at index {i}, outside [0, 1]")
    return np.clip(arr, 0.0, 1.0)


class Judge:
    """P(a[i] beats b[i] | prompts[i]) for a batch; subclasses implement ``_prob``."""

    name = "judge"
    antisymmetric = False  # True: prob(a, b) + prob(b, a) = 1 by construction (both orders are never asked)

    def prob(self, prompts, a, b):
        n = len(prompts)
        if len(a) != n or len(b) != n:
            raise JudgeError(f"judge {self.name!r}: got {n} prompts, {len(a)} responses a, {len(b)} responses b")
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        return check_probs(self.name, self._prob(list(prompts), list(a), list(b)), n)

    def _prob(self, prompts, a, b):
        raise NotImplementedError

    def stats(self):
        """Counters worth logging (e.g. a remote judge's retries, a model judge's forwards); {} by default."""
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


def is_antisymmetric(judge):
    """Whether ``judge`` is antisymmetric by construction (then one order per pair is enough)."""
    return bool(getattr(judge, "antisymmetric", False))


def judge_pairs(judge, prompts, a, b, both_orders=True, batch_size=512):
    """Probabilities that a[i] beats b[i], asked ``batch_size`` pairs per ``judge.prob`` call.

    With ``both_orders`` each chunk holds the pairs and their swaps in one call and the result is
    (p(a, b) + 1 - p(b, a)) / 2, except for an antisymmetric judge (``is_antisymmetric``), asked one order only.
    """
    n = len(prompts)
    if len(a) != n or len(b) != n:
        raise JudgeError(f"judge_pairs: got {n} prompts, {len(a)} responses a, {len(b)} responses b")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts, a, b = list(prompts), list(a), list(b)
    both_orders = both_orders and not is_antisymmetric(judge)
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        p, ca, cb = prompts[s:e], a[s:e], b[s:e]
        if both_orders:
            both = judge.prob(p + p, ca + cb, cb + ca)
            out[s:e] = 0.5 * (both[: e - s] + 1.0 - both[e - s :])
        else:
            out[s:e] = judge.prob(p, ca, cb)
    return out


class MixtureJudge(Judge):
    """Weighted average of sub-judges, e.g. the paper's oracle 1/2 Skywork RM + 1/2 ArmoRM (arXiv 2410.23223).

    A mixture of preference probabilities is again a valid (generally non-BT) preference.
    """

    def __init__(self, judges, weights=None):
        if not judges:
            raise JudgeError("mixture judge needs at least one sub-judge")
        weights = [1.0] * len(judges) if weights is None else [float(w) for w in weights]
        if len(weights) != len(judges):
            raise JudgeError(f"mixture judge: {len(judges)} sub-judges but {len(weights)} weights")
        for j, w in zip(judges, weights):
            if not np.isfinite(w) or w <= 0:
                raise JudgeError(f"mixture judge: weight of {j.name!r} must be > 0, got {w}")
        total = sum(weights)
        self.antisymmetric = all(is_antisymmetric(j) for j in judges)  # a mixture of antisymmetric judges is too
        self.judges = list(judges)
        self.weights = [w / total for w in weights]
        self.name = "mixture(" + ", ".join(f"{w:.3g}*{j.name}" for j, w in zip(self.judges, self.weights)) + ")"

    def _prob(self, prompts, a, b):
        return sum(w * j.prob(prompts, a, b) for j, w in zip(self.judges, self.weights))

    def stats(self):
        return {f"{i}.{k}": v for i, j in enumerate(self.judges) for k, v in j.stats().items()}


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
