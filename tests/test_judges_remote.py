"""Remote judges: our serve endpoint round trip, bearer tokens, OpenRLHF serve_rm's /get_reward, and retries against
a local server that injects faults (slow, 500, malformed JSON, always failing)."""

import json
import os
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
from comal_openrlhf.judges.serve import make_server
from comal_openrlhf.judges.table import TableJudge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, A, B = ["q"] * 4, ["a", "b", "c", "junk"], ["b", "c", "a", "a"]
PAPER = [0.1, 0.1, 0.2, 0.0]  # P(a>b), P(b>c), P(c>a) of the paper game; an invalid response loses


def start(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def served():
    """The paper-game table judge served by ``make_server`` with a bearer token."""
    server = make_server(TableJudge.load("paper"), port=0, token="s3cret")
    yield start(server)
    server.shutdown()
    server.server_close()


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


def test_serve_command_line():
    cmd = [sys.executable, "-m", "comal_openrlhf.judges.serve", "--judge.kind", "table", "--judge.table", "paper"]
    proc = subprocess.Popen(cmd + ["--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving judge table:paper on http://127.0.0.1:"), line
        judge = RemoteJudge(line.split()[-1])
        np.testing.assert_allclose(judge.prob(PROMPTS, A, B), PAPER)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
        p = judge.prob(["q:", "q:", "p:"], ["a", "b", "a"], ["b", "a", "b"])
        # sigmoid((r_a - r_b) / 0.5) with r_a - r_b = 1, -1, 0
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([2.0, -2.0, 0.0]))))
        sent = [t for body in srv.requests for t in body["query"]]
        assert sorted(sent) == sorted(rewards) and [len(b["query"]) for b in srv.requests] == [2, 2]
    finally:
        srv.close()
