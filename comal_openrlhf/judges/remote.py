"""A judge behind HTTP. Two protocols, chosen by the URL's path:

Pairwise (any general preference; served by ``python -m comal_openrlhf.cli.serve_judge``, path ``/prob``)::

    POST {"prompts": ["..."], "responses_a": ["..."], "responses_b": ["..."]}
    ->   {"probs": [0.73, ...]}          # probs[i] = P(responses_a[i] beats responses_b[i] | prompts[i])

OpenRLHF's ``serve_rm`` (a Bradley-Terry reward model; used when the path ends in ``/get_reward``)::

    POST {"query": ["prompt+response", ...]}
    ->   {"rewards": [1.2, ...], "scores": [...], "extra_logs": {...}}

serve_rm scores the texts as given (no chat template, no special tokens added), so the client sends
prompt + response concatenated; format prompts beforehand if the reward model expects a template. Each unique text
is scored once per call and P(a beats b) = sigmoid((r_a - r_b) / temperature).

Requests carry at most ``batch_size`` comparisons (or texts). ``timeout`` is a total deadline for one request:
looking up the host, connecting, sending, waiting and reading together, whatever the answer's framing (Content-Length,
chunked, or read until the server closes, as HTTP/1.0 and ``Connection: close`` servers answer). A server that
trickles its headers or its answer a byte at a time is cut off when the deadline passes, not when one read stalls;
an answer that arrived whole before the deadline is kept. Connection errors, deadlines, HTTP 5xx and malformed JSON are
retried ``retries`` times with exponential backoff (``backoff``, 2*backoff, ... each wait at most ``max_backoff``
seconds, so a request costs at most (retries + 1) * timeout + retries * max_backoff); each retry is logged (logger
``comal_openrlhf.judges.remote``, WARNING) and counted in ``stats()``. Then a JudgeError names the URL, the number
of attempts and the last cause. Other HTTP errors (401, 400...) fail at once. ``token`` is sent as a bearer token.
"""

import http.client
import io
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from urllib.parse import urlparse

import numpy as np

from comal_openrlhf.core.judging import Judge, JudgeError

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
        self._ssl_context = None  # made on the first https request

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
        """One attempt under a total deadline of ``timeout`` seconds (see ``_exchange``)."""
        try:
            status, raw = self._exchange(data, headers, time.monotonic() + self.timeout)
        except TimeoutError:  # socket.timeout is TimeoutError; so is _DeadlinePassed
            raise _Retryable(f"timed out: no complete answer within the {self.timeout:g} s deadline") from None
        except (OSError, http.client.HTTPException) as e:  # ConnectionError, ssl.SSLError... are OSErrors
            raise _Retryable(f"{type(e).__name__}: {e}") from None
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

    def _exchange(self, data, headers, deadline):
        """POST ``data`` and read the whole answer by ``deadline`` (time.monotonic()), whatever its framing
        (Content-Length, chunked, or read until the server closes: HTTP/1.0, ``Connection: close``).

        Every call that can block (name lookup, connect, TLS handshake, each send, each receive) is given at most
        the time left, and the deadline is checked again before each of them, so an attempt ends by the deadline
        (plus the time to take bytes that had already arrived): no timer, no socket shared between threads. An
        answer read to its end is kept, however close to the deadline its last byte came. Returns (status, body).
        """
        u = urlparse(self.url)
        https = u.scheme == "https"
        port = u.port or (443 if https else 80)
        sock = _connect(u.hostname, port, deadline)
        try:
            if https:
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context()
                    self._ssl_context.set_alpn_protocols(["http/1.1"])
                sock.settimeout(_time_left(deadline))  # CPython bounds the whole handshake by the socket timeout
                sock = self._ssl_context.wrap_socket(sock, server_hostname=u.hostname)
            _Request(u.hostname, port, 443 if https else 80, sock, deadline).request(
                "POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body=data, headers=headers
            )
            resp = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method="POST")
            try:
                resp.begin()  # status line and headers
                return resp.status, resp.read()  # http.client's framing; every receive goes through _DeadlineReader
            finally:
                resp.close()
        finally:
            sock.close()


class _DeadlinePassed(TimeoutError):
    pass


def _time_left(deadline):
    """Seconds left before ``deadline``, a timeout for the next blocking call; _DeadlinePassed once none is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlinePassed("deadline passed")
    return left


def _resolve(host, port, deadline):
    """getaddrinfo takes no timeout: a name (not an address) is looked up in a daemon thread, left behind if it has
    not answered by the deadline."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # numeric: no lookup, never blocks
    result = {}

    def lookup():
        try:
            result["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(_time_left(deadline))
    if thread.is_alive():
        raise _DeadlinePassed(f"looking up {host}")
    if "error" in result:
        raise result["error"]
    return result["addresses"]


def _connect(host, port, deadline):
    """A TCP connection to the first address of ``host`` that accepts one, all addresses within the deadline."""
    error = OSError(f"no address found for {host}")
    for family, kind, proto, _, address in _resolve(host, port, deadline):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_time_left(deadline))
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            error = e
    raise error


def _sendall(sock, data, deadline):
    """socket.sendall with each send bounded by the time left (SSLSocket.sendall gives each send the full
    timeout)."""
    view, sent = memoryview(data).cast("B"), 0
    while sent < len(view):
        sock.settimeout(_time_left(deadline))
        sent += sock.send(view[sent:])


class _Request(http.client.HTTPConnection):
    """http.client formats the request (Host, Content-Length...) and sends it on a connected socket, each send
    bounded by the time left."""

    def __init__(self, host, port, default_port, sock, deadline):
        super().__init__(host, port)
        self.default_port, self.sock, self.deadline = default_port, sock, deadline  # the Host header omits 80/443

    def connect(self):  # the socket is connected already; http.client reconnects only after a close
        raise http.client.CannotSendRequest("the connection is closed")

    def send(self, data):
        _sendall(self.sock, data, self.deadline)


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket (``makefile``), reading through _DeadlineReader."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode="rb"):
        return io.BufferedReader(_DeadlineReader(self.sock, self.deadline))


class _DeadlineReader(io.RawIOBase):
    """Reads a socket under a deadline. Before it, each receive waits at most the time left. After it, nothing waits:
    a receive takes only bytes that had already arrived, at most the receive buffer's size (what the kernel can have
    been holding at the deadline, so a server streaming without end cannot keep the reader going), and the first
    one that finds none raises _DeadlinePassed. So an answer that had fully arrived is kept even if this thread
    came to read it late."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline, self.late_bytes = sock, deadline, None

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left > 0:
            self.sock.settimeout(left)
            return self.sock.recv_into(buffer)
        if self.late_bytes is None:
            pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0  # decrypted, not read
            self.late_bytes = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + pending
        if self.late_bytes <= 0:
            raise _DeadlinePassed("deadline passed")
        self.sock.settimeout(0.0)  # non-blocking
        try:
            got = self.sock.recv_into(buffer, min(len(buffer), self.late_bytes))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise _DeadlinePassed("deadline passed") from None
        self.late_bytes -= got
        return got
