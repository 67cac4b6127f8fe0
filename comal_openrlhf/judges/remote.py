"""A judge behind HTTP. Two protocols, chosen by the URL's path:

Pairwise (any general preference; served by ``python -m comal_openrlhf.judges.serve``, path ``/prob``)::

    POST {"prompts": ["..."], "responses_a": ["..."], "responses_b": ["..."]}
    ->   {"probs": [0.73, ...]}          # probs[i] = P(responses_a[i] beats responses_b[i] | prompts[i])

OpenRLHF's ``serve_rm`` (a Bradley-Terry reward model; used when the path ends in ``/get_reward``)::

    POST {"query": ["prompt+response", ...]}
    ->   {"rewards": [1.2, ...], "scores": [...], "extra_logs": {...}}

serve_rm scores the texts as given (no chat template, no special tokens added), so the client sends
prompt + response concatenated; format prompts beforehand if the reward model expects a template. Each unique text
is scored once per call and P(a beats b) = sigmoid((r_a - r_b) / temperature).

Requests carry at most ``batch_size`` comparisons (or texts). Connection errors, timeouts, HTTP 5xx and malformed
JSON are retried ``retries`` times with exponential backoff (``backoff``, 2*backoff, ...); then a JudgeError names
the URL and the last cause. Other HTTP errors (401, 400...) fail at once. ``token`` is sent as a bearer token.
"""

import http.client
import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import numpy as np

from .base import Judge, JudgeError


class _Retryable(Exception):
    pass


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free logistic


class RemoteJudge(Judge):
    def __init__(self, url, token=None, timeout=60.0, retries=3, batch_size=64, temperature=1.0, backoff=1.0):
        if not url or urlparse(url).scheme not in ("http", "https"):
            raise JudgeError(f"remote judge needs an http(s) URL (--judge.url), got {url!r}")
        if temperature <= 0:
            raise JudgeError(f"remote judge {url}: temperature must be > 0, got {temperature}")
        self.url, self.token, self.timeout, self.temperature = url, token, float(timeout), temperature
        self.retries, self.batch_size, self.backoff = int(retries), int(batch_size), backoff
        self.reward_mode = urlparse(url).path.rstrip("/").endswith("/get_reward")
        self.name = f"remote:{url}"

    def _prob(self, prompts, a, b):
        if self.reward_mode:
            texts = list(dict.fromkeys(p + r for p, r in zip(prompts + prompts, a + b)))
            rewards = {}
            for s in range(0, len(texts), self.batch_size):
                chunk = texts[s : s + self.batch_size]
                rewards.update(zip(chunk, self._post({"query": chunk}, "rewards", len(chunk))))
            diff = np.array([rewards[p + x] - rewards[p + y] for p, x, y in zip(prompts, a, b)])
            return sigmoid(diff / self.temperature)
        out = []
        for s in range(0, len(prompts), self.batch_size):
            e = s + self.batch_size
            body = {"prompts": prompts[s:e], "responses_a": a[s:e], "responses_b": b[s:e]}
            out.extend(self._post(body, "probs", len(body["prompts"])))
        return out

    def _post(self, body, key, n):
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        cause = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post_once(data, headers, key, n)
            except _Retryable as e:
                cause = e.args[0]
        raise JudgeError(f"remote judge {self.url} failed after {self.retries + 1} attempts; last cause: {cause}")

    def _post_once(self, data, headers, key, n):
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail}")
            raise JudgeError(f"remote judge {self.url} answered HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
        try:
            values = json.loads(raw)[key]
            if not isinstance(values, list) or len(values) != n:
                raise ValueError(f"expected a list of {n} under {key!r}")
            return [float(v) for v in values]
        except (ValueError, KeyError, TypeError) as e:
            raise _Retryable(f"malformed JSON answer ({type(e).__name__}: {e}): {raw[:200]!r}")
