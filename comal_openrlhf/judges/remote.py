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

Requests carry at most ``batch_size`` comparisons (or texts). ``timeout`` is a total deadline for one request:
connecting, sending, waiting and reading together (a server that trickles its answer a byte at a time is cut off
when the deadline passes, not when one read stalls). Connection errors, deadlines, HTTP 5xx and malformed JSON are
retried ``retries`` times with exponential backoff (``backoff``, 2*backoff, ... each wait at most ``max_backoff``
seconds, so a request costs at most (retries + 1) * timeout + retries * max_backoff); each retry is logged (logger
``comal_openrlhf.judges.remote``, WARNING) and counted in ``stats()``. Then a JudgeError names the URL, the number
of attempts and the last cause. Other HTTP errors (401, 400...) fail at once. ``token`` is sent as a bearer token.
"""

import http.client
import json
import logging
import socket
import threading
import time
from urllib.parse import urlparse

import numpy as np

from .base import Judge, JudgeError

MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts
log = logging.getLogger(__name__)


class _Retryable(Exception):
    pass


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free logistic


class RemoteJudge(Judge):
    def __init__(
        self,
        url,
        token=None,
        timeout=60.0,
        retries=3,
        batch_size=64,
        temperature=1.0,
        backoff=1.0,
        max_backoff=MAX_BACKOFF,
    ):
        if not url or urlparse(url).scheme not in ("http", "https") or not urlparse(url).hostname:
            raise JudgeError(f"remote judge needs an http(s) URL (--judge.url), got {url!r}")
        if temperature <= 0:
            raise JudgeError(f"remote judge {url}: temperature must be > 0, got {temperature}")
        if not timeout > 0 or int(retries) < 0 or int(batch_size) < 1:
            raise JudgeError(
                f"remote judge {url}: need --judge.timeout > 0, --judge.retries >= 0 and --judge.batch_size >= 1, "
                f"got {timeout}, {retries}, {batch_size}"
            )
        self.url, self.token, self.timeout, self.temperature = url, token, float(timeout), temperature
        self.retries, self.batch_size = int(retries), int(batch_size)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.reward_mode = urlparse(url).path.rstrip("/").endswith("/get_reward")
        self.antisymmetric = self.reward_mode  # sigmoid of reward differences: judge_pairs asks one order
        self.name = f"remote:{url}"
        self.counts = {"requests": 0, "retries": 0, "failed_requests": 0}

    def stats(self):
        """Requests sent (each answered or given up), retries after failed attempts, requests given up."""
        return dict(self.counts)

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
        self.counts["requests"] += 1
        cause = None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                self.counts["retries"] += 1
                log.warning(
                    "remote judge %s: attempt %d of %d failed (%s); retrying in %.3g s",
                    self.url,
                    attempt,
                    self.retries + 1,
                    cause,
                    wait,
                )
                time.sleep(wait)
            try:
                return self._post_once(data, headers, key, n)
            except _Retryable as e:
                cause = e.args[0]
        self.counts["failed_requests"] += 1
        raise JudgeError(f"remote judge {self.url} failed after {self.retries + 1} attempts; last cause: {cause}")

    def _post_once(self, data, headers, key, n):
        """One attempt under a total deadline of ``timeout`` seconds: a timer shuts the socket down when it
        passes, which ends any blocked connect, send or read."""
        u = urlparse(self.url)
        conn_class = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(u.hostname, u.port, timeout=self.timeout)
        expired = threading.Event()

        def cut():
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, cut)
        timer.daemon = True
        timer.start()
        late = f"timed out: no complete answer within the {self.timeout:g} s deadline"
        try:
            conn.connect()
            if expired.is_set():
                raise _Retryable(late)
            conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body=data, headers=headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:  # ConnectionError and TimeoutError are OSErrors
            raise _Retryable(late if expired.is_set() else f"{type(e).__name__}: {e}") from None
        finally:
            timer.cancel()
            conn.close()
        if expired.is_set():
            raise _Retryable(late)  # the deadline passed as the last bytes arrived: a cut answer may parse
        if status >= 500:
            raise _Retryable(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
        if status >= 400:
            raise JudgeError(f"remote judge {self.url} answered HTTP {status}: {raw[:300].decode(errors='replace')}")
        try:
            values = json.loads(raw)[key]
            if not isinstance(values, list) or len(values) != n:
                raise ValueError(f"expected a list of {n} under {key!r}")
            return [float(v) for v in values]
        except (ValueError, KeyError, TypeError) as e:
            raise _Retryable(f"malformed JSON answer ({type(e).__name__}: {e}): {raw[:200]!r}") from None
