"""Remote judges: our serve endpoint round trip (FastAPI/uvicorn and the stdlib fallback), bearer tokens, a load
test, OpenRLHF serve_rm's /get_reward, and retries against local servers that inject faults (slow, 500, malformed
JSON, always failing, trickling one byte at a time in each framing of an answer)."""

import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from comal_openrlhf.cli.serve_judge import fastapi_available, make_server, make_uvicorn_server
from comal_openrlhf.core.judging import TableJudge
from comal_openrlhf.judges import JudgeError, build_judge
from comal_openrlhf.judges.remote import RemoteJudge

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
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.serve_judge", "--judge.kind", "table", "--judge.table", "paper"]
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


FRAMINGS = ["length", "chunked", "close", "http10"]


def read_request(conn):
    """Read one whole request (headers and Content-Length body), so that closing never resets the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return data
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    while length and len(body) < length[0]:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


def framed(framing, body):
    """(status line and headers, body as sent) of a 200 answer framed as: ``length`` (HTTP/1.1, Content-Length,
    connection kept open), ``chunked`` (HTTP/1.1, Transfer-Encoding: chunked, kept open), ``close`` (HTTP/1.1,
    Connection: close, the body ends when the server closes) or ``http10`` (HTTP/1.0, no length, ends at close)."""
    status = b"HTTP/1.0 200 OK\r\n" if framing == "http10" else b"HTTP/1.1 200 OK\r\n"
    head = status + b"Content-Type: application/json\r\nX-Padding: " + b"p" * 40 + b"\r\n"
    if framing == "length":
        head += b"Content-Length: %d\r\n" % len(body)
    elif framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    elif framing == "close":
        head += b"Connection: close\r\n"
    return head + b"\r\n", body


class TrickleServer:
    """Answers every POST with {"probs": [0.25]} (padded with ``pad`` spaces) in one ``framing`` (see framed), and
    sends the status line and headers (``where`` = "headers") or the body ("body") one byte at a time, spread evenly
    over ``seconds`` (the last byte at ``seconds``), the rest at once: each read returns within any per-read timeout,
    the whole answer only after ``seconds``. Then it closes (close, http10) or waits for the client to close (length,
    chunked). ``accepted`` holds the time.monotonic() of each connection."""

    def __init__(self, where, framing="length", seconds=30.0, pad=1000):
        self.stop, self.accepted = threading.Event(), []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/prob" % self.sock.getsockname()[1]
        head, body = framed(framing, b'{"probs": [0.25]' + b" " * pad + b"}")
        self.slow, self.fast = (head, body) if where == "headers" else (body, head)
        self.where, self.framing, self.seconds = where, framing, seconds
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            try:
                read_request(conn)
                t0, step = time.monotonic(), self.seconds / len(self.slow)
                if self.where == "body":
                    conn.sendall(self.fast)
                for i in range(len(self.slow)):
                    if self.stop.wait(max(0.0, t0 + (i + 1) * step - time.monotonic())):  # the last at seconds
                        return
                    conn.sendall(self.slow[i : i + 1])
                if self.where == "headers":
                    conn.sendall(self.fast)
                if self.framing in ("length", "chunked"):  # keep-alive: the client must not wait for the close
                    conn.settimeout(10)
                    conn.recv(1)
            except OSError:  # the client gave up and closed
                return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("where", ["headers", "body"])
def test_remote_timeout_is_a_total_deadline(where, framing):
    """A server that trickles its answer is cut off at the deadline whatever the framing (an HTTP/1.0 or Connection:
    close answer escaped the deadline: --judge.timeout 2 took 15 s), three attempts and two waits in all."""
    srv = TrickleServer(where, framing)
    try:
        judge = RemoteJudge(srv.url, timeout=0.5, retries=2, backoff=0.05)
        t0 = time.monotonic()
        with pytest.raises(JudgeError, match="timed out: no complete answer within the 0.5 s deadline") as e:
            judge.prob(["q"], ["a"], ["b"])
        elapsed = time.monotonic() - t0
        assert f"remote judge {srv.url} failed after 3 attempts" in str(e.value)
        # (retries + 1) * timeout + backoffs (0.05 + 0.1 s), with slack; the answer alone would take 30 s per attempt
        assert elapsed < 3 * 0.5 + 0.15 + 1.0, elapsed
        starts = srv.accepted + [t0 + elapsed]
        attempts = [b - a for a, b in zip(starts, starts[1:])]  # each attempt and the wait after it
        assert len(srv.accepted) == 3 and max(attempts) < 0.5 + 0.1 + 0.5, attempts
        assert judge.stats() == {"requests": 1, "retries": 2, "failed_requests": 1}
    finally:
        srv.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("where", ["headers", "body"])
def test_remote_keeps_an_answer_completed_inside_the_deadline(where, framing):
    """The same trickle, ending 0.9 s into a 1.5 s deadline: the answer is taken at the first attempt."""
    srv = TrickleServer(where, framing, seconds=0.9, pad=40)
    try:
        judge = RemoteJudge(srv.url, timeout=1.5, retries=2, backoff=5.0)  # a retry would wait 5 s
        t0 = time.monotonic()
        np.testing.assert_allclose(judge.prob(["q"], ["a"], ["b"]), [0.25])
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 1.5, elapsed
        assert len(srv.accepted) == 1 and judge.stats() == {"requests": 1, "retries": 0, "failed_requests": 0}
    finally:
        srv.close()


@pytest.mark.parametrize("framing", FRAMINGS)
def test_remote_keeps_an_answer_that_arrived_before_the_deadline_but_was_read_after(framing, monkeypatch):
    """The whole answer is in the socket's buffer before the deadline, but the client only comes to read it after
    (a busy process): it is kept, not thrown away as timed out."""
    from comal_openrlhf.judges import remote

    srv = TrickleServer("body", framing, seconds=0.0, pad=40)  # answers at once
    readinto = remote._DeadlineReader.readinto

    def late_readinto(self, buffer):
        time.sleep(max(0.0, self.deadline - time.monotonic() + 0.05))
        return readinto(self, buffer)

    monkeypatch.setattr(remote._DeadlineReader, "readinto", late_readinto)
    try:
        judge = RemoteJudge(srv.url, timeout=0.3, retries=0)
        np.testing.assert_allclose(judge.prob(["q"], ["a"], ["b"]), [0.25])
        assert len(srv.accepted) == 1
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_remote_reads_past_the_deadline_only_what_had_arrived():
    """After the deadline the reader never waits and takes at most a receive buffer's worth of bytes, so a server
    that streams without end cannot keep it reading."""
    from comal_openrlhf.judges import remote

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    server, _ = listener.accept()
    stop = threading.Event()

    def flood():
        chunk = b" " * 65536
        try:
            while not stop.is_set():
                server.sendall(chunk)
        except OSError:
            pass

    threading.Thread(target=flood, daemon=True).start()
    try:
        time.sleep(0.2)  # the buffers fill up
        reader = remote._DeadlineReader(client, deadline=time.monotonic() - 1.0)
        buffer, got, t0 = bytearray(65536), 0, time.monotonic()
        with pytest.raises(TimeoutError):
            while True:
                got += reader.readinto(buffer)
        rcvbuf = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert 0 < got <= rcvbuf and time.monotonic() - t0 < 1.0, (got, rcvbuf)
    finally:
        stop.set()
        for s in (client, server, listener):
            s.close()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1 (cert, key), made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1"]
    cmd += ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode:
        pytest.skip(f"openssl could not make a certificate: {done.stderr[-300:]}")
    return cert, key


class TLSTrickleServer(TrickleServer):
    """TrickleServer over TLS (the handshake at once, then the trickle inside TLS records)."""

    def __init__(self, cert, key, *args, **kwargs):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        super().__init__(*args, **kwargs)
        self.url = self.url.replace("http://127.0.0.1", "https://localhost")

    def _trickle(self, conn):
        try:
            conn.settimeout(10)
            conn = self.context.wrap_socket(conn, server_side=True)
            conn.settimeout(None)
        except OSError:
            conn.close()
            return
        super()._trickle(conn)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", ["length", "http10"])
def test_remote_https_deadline_holds_and_keeps_a_timely_answer(framing, tls_cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_cert[0])  # the judge's default context trusts our certificate
    srv = TLSTrickleServer(*tls_cert, "body", framing, seconds=0.9, pad=40)
    try:
        judge = RemoteJudge(srv.url, timeout=1.5, retries=0)
        t0 = time.monotonic()
        np.testing.assert_allclose(judge.prob(["q"], ["a"], ["b"]), [0.25])
        assert 0.9 <= time.monotonic() - t0 < 1.5
    finally:
        srv.close()
    srv = TLSTrickleServer(*tls_cert, "body", framing)
    try:
        judge = RemoteJudge(srv.url, timeout=0.5, retries=1, backoff=0.05)
        t0 = time.monotonic()
        with pytest.raises(JudgeError, match=f"{srv.url} failed after 2 attempts; last cause: timed out"):
            judge.prob(["q"], ["a"], ["b"])
        assert time.monotonic() - t0 < 2 * 0.5 + 0.05 + 1.0
    finally:
        srv.close()


def test_remote_deadline_covers_a_stuck_name_lookup(monkeypatch):
    """getaddrinfo takes no timeout; a lookup that hangs is left behind at the deadline."""
    lookup = socket.getaddrinfo

    def stuck(host, *args, **kwargs):
        if host == "judge.invalid":
            time.sleep(3.0)
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    judge = RemoteJudge("http://judge.invalid:9/prob", timeout=0.3, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match="failed after 2 attempts; last cause: timed out"):
        judge.prob(["q"], ["a"], ["b"])
    assert time.monotonic() - t0 < 2 * 0.3 + 0.01 + 1.0


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
