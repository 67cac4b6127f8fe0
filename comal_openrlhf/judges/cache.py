"""A judge whose answers are remembered per ordered (prompt, a, b), in memory and in an append-only JSON-lines file,
so a rerun after a crash, or with one more policy or more samples, asks the judge only for what is new."""

import json
import os

import numpy as np

from comal_openrlhf.storage import append_lines, content_key, read_cache


class CachedJudge:
    """A judge whose answers P(a beats b | prompt) are remembered per ordered (prompt, a, b), in memory and, with
    ``path``, in an append-only JSON-lines file. ``calls`` counts the comparisons actually sent to the judge."""

    def __init__(self, judge, path=None):
        self.judge = judge
        self.name = getattr(judge, "name", "judge")
        self.antisymmetric = bool(getattr(judge, "antisymmetric", False))
        self.path = path
        self.memo = {}
        self.calls = 0
        self.hits = 0
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            for row in read_cache(path):
                self.memo[row["k"]] = row["p"]

    def prob(self, prompts, a, b):
        keys = [content_key(p, x, y) for p, x, y in zip(prompts, a, b)]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.memo}.values())
        self.hits += len(keys) - len(todo)
        if todo:
            got = self.judge.prob([prompts[i] for i in todo], [a[i] for i in todo], [b[i] for i in todo])
            self.calls += len(todo)
            new = {keys[i]: float(p) for i, p in zip(todo, got)}
            self.memo.update(new)
            if self.path:
                append_lines(self.path, [json.dumps({"k": k, "p": p}) for k, p in new.items()])
        return np.array([self.memo[k] for k in keys], dtype=np.float64)
