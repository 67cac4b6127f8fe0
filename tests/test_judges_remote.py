"""Remote judges: our serve endpoint round trip (FastAPI/uvicorn and the stdlib fallback), bearer tokens, a load
test, OpenRLHF serve_rm's /get_reward, and retries against local servers that inject faults (slow, 500, malformed
JSON, always failing, trickling one byte at a time)."""

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from comal_openrlhf.judges import JudgeError, build_judge
from comal_openrlhf.judges.remote import RemoteJudge
from comal_openrlhf.judges.serve import fastapi_available, make_server, make_uvicorn_server
from comal_openrlhf.judges.table import TableJudge

BACKENDS = [
    "stdlib",
    pytest.param(
        "fastapi", marks=pytest.mark.skipif(not fastapi_available(), reason="needs the 'serve' extra (fastapi)")
    ),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, A, B = ["q"] * 4, ["a", "b", "c", "junk"], ["b", "c", "a", "a"]
PAPER = [0.1, 0.1, 0.2, 0.0]  # P(a>b), P(b>c), P(c>a) of the paper game; an invalid response loses


def start(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


class Served:
    """A judge served in this process by one backend: ``url``, then ``close()``."""

    def __init__(self, judge, backend, token=None):
        self.backend = backend
        if backend == "stdlib":
            self.server = make_server(judge, port=0, token=token)
            self.url = start(self.server)
            return
        self.server, sock = make_uvicorn_server(judge, port=0, token=token, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self):
        if self.backend == "stdlib":
            self.server.shutdown()
            self.server.server_close()
        else:
            self.server.should_exit = True
            self.thread.join(timeout=30)


@pytest.fixture(params=BACKENDS)
def served(request):
    """The paper-game table judge served with a bearer token, by each backend."""
    srv = Served(TableJudge.load("paper"), request.param, token="s3cret")
    yield srv.url
    srv.close()


def post(url, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        url, data=body if isinstance(body, bytes) else json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_round_trip_with_token(served):
    judge = build_judge({"kind": "remote", "url": served + "/prob", "token": "s3cret", "batch_size": 3})
    np.testing.assert_allclose(judge.prob(PROMPTS, A, B), PAPER)  # two requests of <= 3 comparisons
    with urllib.request.urlopen(served + "/health", timeout=5) as r:
        assert json.loads(r.read()) == {"status": "ok", "judge": "table:paper"}


def test_serve_refuses_wrong_token_without_retrying(served):
    for token in (None, "wrong"):
        judge = RemoteJudge(served + "/prob", token=token, retries=3, backoff=10.0)
        t0 = time.time()
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.prob(PROMPTS, A, B)
        assert time.time() - t0 < 5  # a 4xx is not retried (backoff would take 10 s)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"{not json", "malformed"),
        ({"prompts": ["q"], "responses_a": ["a"]}, "responses_b"),
        ({"prompts": ["q"], "responses_a": ["a"], "responses_b": ["a", "b"]}, "same length"),
        ({"prompts": ["q"], "responses_a": [1], "responses_b": ["a"]}, "list of strings"),
    ],
)
def test_serve_answers_400_on_malformed_requests(served, body, match):
    code, answer = post(served + "/prob", body, token="s3cret")
    assert code == 400 and match in answer["error"]


def test_serve_unknown_path_is_404(served):
    code, answer = post(served + "/nowhere", {}, token="s3cret")
    assert code == 404 and "/prob" in answer["error"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_holds_200_concurrent_requests(backend):
    """The concurrency of an 8-rank run sending a batch of prompts at once, on loopback: none dropped or reset
    (the stdlib server's default listen backlog of 5 reset most of them)."""
    n = 200
    srv = Served(TableJudge.load("paper"), backend)
    host, port = srv.url.split("//")[1].split(":")
    body = json.dumps({"prompts": ["q", "q"], "responses_a": ["b", "c"], "responses_b": ["a", "b"]}).encode()
    barrier, answers = threading.Barrier(n), [None] * n

    def client(i):
        barrier.wait(timeout=60)  # all connect at once
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/prob", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answers[i] = (resp.status, json.loads(resp.read()))
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            answers[i] = repr(e)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        srv.close()
    failed = [a for a in answers if a != (200, {"probs": [0.9, 0.9]})]
    assert not failed, f"{len(failed)} of {n} requests failed, e.g. {failed[:3]}"


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_command_line(backend):
    cmd = [sys.executable, "-m", "comal_openrlhf.judges.serve", "--judge.kind", "table", "--judge.table", "paper"]
    cmd += ["--port", "0", "--backend", backend]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving judge table:paper on http://127.0.0.1:"), line + proc.stderr.read()
        judge = RemoteJudge(line.split()[-1])
        np.testing.assert_allclose(judge.prob(PROMPTS, A, B), PAPER)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert ("uvicorn" in err) == (backend == "fastapi"), err


class FaultServer:
    """A local server that plays a script of behaviours, one per request: ok, slow, 500, badjson, close."""

    def __init__(self, script, rewards=None):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                action = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if action == "close":
                    self.close_connection = True
                    return  # no answer at all
                if action == "slow":
                    time.sleep(0.6)
                if "query" in body:
                    answer = {"rewards": [rewards[t] for t in body["query"]], "scores": [], "extra_logs": {}}
                else:
                    answer = {"probs": [0.25] * len(body["prompts"])}
                data, code = json.dumps(answer).encode(), 200
                if action == "500":
                    data, code = b'{"error": "overloaded"}', 500
                elif action == "badjson":
                    data = b'{"probs": [0.25, '
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = start(self.server)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("fault", ["slow", "500", "badjson", "close"])
def test_remote_retries_then_succeeds(fault):
    srv = FaultServer([fault, fault, "ok"])
    try:
        judge = RemoteJudge(srv.url + "/prob", timeout=0.3, retries=2, backoff=0.01)
        np.testing.assert_allclose(judge.prob(["q"] * 2, ["a", "b"], ["b", "a"]), [0.25, 0.25])
        assert len(srv.requests) == 3
    finally:
        srv.close()


@pytest.mark.parametrize("fault, cause", [("500", "HTTP 500"), ("badjson", "malformed JSON"), ("slow", "timed out")])
def test_remote_gives_up_after_last_retry_naming_url_and_cause(fault, cause):
    srv = FaultServer([fault])
    try:
        judge = RemoteJudge(srv.url + "/prob", timeout=0.3, retries=2, backoff=0.01)
        with pytest.raises(JudgeError, match=cause) as e:
            judge.prob(["q"], ["a"], ["b"])
        assert srv.url + "/prob" in str(e.value) and "3 attempts" in str(e.value)
        assert len(srv.requests) == 3
    finally:
        srv.close()


def test_remote_unreachable_names_url():
    srv = FaultServer(["ok"])
    url = srv.url + "/prob"
    srv.close()  # nothing listens on that port any more
    with pytest.raises(JudgeError, match=f"{url} failed after 2 attempts"):
        RemoteJudge(url, retries=1, backoff=0.01).prob(["q"], ["a"], ["b"])


def test_remote_serve_rm_get_reward():
    # OpenRLHF serve_rm scores prompt+response texts; here r("q:a") = 1, r("q:b") = 0, r("p:a") = 2
    rewards = {"q:a": 1.0, "q:b": 0.0, "p:a": 2.0, "p:b": 2.0}
    srv = FaultServer(["ok"], rewards=rewards)
    try:
        judge = RemoteJudge(srv.url + "/get_reward", temperature=0.5, batch_size=2)
        assert judge.antisymmetric and not RemoteJudge(srv.url + "/prob").antisymmetric
        p = judge.prob(["q:", "q:", "p:"], ["a", "b", "a"], ["b", "a", "b"])
        # sigmoid((r_a - r_b) / 0.5) with r_a - r_b = 1, -1, 0
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([2.0, -2.0, 0.0]))))
        sent = [t for body in srv.requests for t in body["query"]]
        assert sorted(sent) == sorted(rewards) and [len(b["query"]) for b in srv.requests] == [2, 2]
    finally:
        srv.close()


class TrickleServer:
    """Answers every request one byte per ``interval`` seconds, in the status line and headers (``where`` =
    "headers") or in a long body ("body"): each read returns within the socket timeout, the whole never does."""

    def __init__(self, where, interval=0.05, seconds=30.0):
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/prob" % self.sock.getsockname()[1]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        self.slow, self.fast = (head, b"") if where == "headers" else (b'{"probs": [' + b" " * 99988, head)
        self.interval, self.seconds = interval, seconds
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            conn.recv(65536)  # the request (small)
            t0 = time.monotonic()
            try:
                conn.sendall(self.fast)
                for i in range(len(self.slow)):
                    if self.stop.is_set() or time.monotonic() - t0 > self.seconds:
                        return
                    conn.sendall(self.slow[i : i + 1])
                    time.sleep(self.interval)
            except OSError:  # the client gave up and closed
                return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["headers", "body"])
def test_remote_timeout_is_a_total_deadline(where):
    srv = TrickleServer(where)
    try:
        judge = RemoteJudge(srv.url, timeout=0.5, retries=1, backoff=0.01)
        t0 = time.monotonic()
        with pytest.raises(JudgeError, match="timed out: no complete answer within the 0.5 s deadline"):
            judge.prob(["q"], ["a"], ["b"])
        elapsed = time.monotonic() - t0
        # two attempts of at most 0.5 s each and a 0.01 s wait; a per-read timeout would wait for all the bytes
        assert elapsed < 2 * 0.5 + 0.01 + 1.0, elapsed
        assert judge.stats() == {"requests": 1, "retries": 1, "failed_requests": 1}
    finally:
        srv.close()


def test_remote_retries_are_bounded_logged_and_counted(caplog):
    srv = FaultServer(["500", "close", "ok"])
    try:
        # the backoff would be 100 s, then 200 s: each wait is capped at max_backoff
        judge = RemoteJudge(srv.url + "/prob", timeout=5, retries=3, backoff=100.0, max_backoff=0.05)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="comal_openrlhf.judges.remote"):
            np.testing.assert_allclose(judge.prob(["q"], ["a"], ["b"]), [0.25])
        assert time.monotonic() - t0 < 5
        assert judge.stats() == {"requests": 1, "retries": 2, "failed_requests": 0}
        messages = [r.getMessage() for r in caplog.records if r.name == "comal_openrlhf.judges.remote"]
        assert len(messages) == 2
        assert "attempt 1 of 4 failed (HTTP 500" in messages[0] and "retrying in 0.05 s" in messages[0]
        assert "attempt 2 of 4 failed (RemoteDisconnected" in messages[1]
    finally:
        srv.close()


def test_remote_flags_reach_the_judge():
    judge = build_judge({"kind": "remote", "url": "http://127.0.0.1:9/prob", "timeout": 2.5, "retries": 0})
    assert (judge.timeout, judge.retries, judge.max_backoff) == (2.5, 0, 30.0)
    with pytest.raises(JudgeError, match="--judge.timeout > 0"):
        build_judge({"kind": "remote", "url": "http://127.0.0.1:9/prob", "timeout": 0})
