"""Host any judge over HTTP (the pairwise protocol of ``judges/remote.py``), e.g. a judge model on its own GPU.

    python -m comal_openrlhf.judges.serve --judge.kind reward_model --judge.path /models/rm --port 5000
    python -m comal_openrlhf.judges.serve --judge.kind table --judge.table paper --port 0 --token SECRET

Endpoints:
    POST /prob    {"prompts": [...], "responses_a": [...], "responses_b": [...]} -> {"probs": [...]}
    GET  /health  -> {"status": "ok", "judge": NAME}

Binds 127.0.0.1 unless --host says otherwise. With --token (or $COMAL_JUDGE_TOKEN) POST /prob needs
``Authorization: Bearer TOKEN`` (401 otherwise). Malformed requests get 400, judge failures 500, both with
{"error": ...}. Clients: ``--judge.kind remote --judge.url http://HOST:PORT/prob``.
"""

import argparse
import hmac
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import JudgeError, add_judge_args, build_judge

MAX_BODY_BYTES = 256 * 1024 * 1024


def _parse_request(raw):
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise TypeError("body must be a JSON object")
    fields = [body.get(k) for k in ("prompts", "responses_a", "responses_b")]
    for key, value in zip(("prompts", "responses_a", "responses_b"), fields):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise TypeError(f"{key!r} must be a list of strings")
    if not len(fields[0]) == len(fields[1]) == len(fields[2]):
        raise ValueError("prompts, responses_a and responses_b must have the same length")
    return fields


def make_server(judge, host="127.0.0.1", port=0, token=None):
    """A ThreadingHTTPServer serving ``judge``; call ``serve_forever()`` (port 0 picks a free port)."""
    lock = threading.Lock()  # one judge call at a time: model judges are not thread-safe

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "judge": judge.name})
            else:
                self._reply(404, {"error": f"unknown path {self.path}; use POST /prob or GET /health"})

        def do_POST(self):
            if self.path.rstrip("/") != "/prob":
                return self._reply(404, {"error": f"unknown path {self.path}; use POST /prob"})
            if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            try:
                length = int(self.headers.get("Content-Length", ""))
                if not 0 <= length <= MAX_BODY_BYTES:
                    raise ValueError(f"Content-Length {length} out of range")
                prompts, a, b = _parse_request(self.rfile.read(length))
            except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
                return self._reply(400, {"error": f"malformed request: {e}"})
            try:
                with lock:
                    probs = judge.prob(prompts, a, b)
            except JudgeError as e:
                return self._reply(500, {"error": str(e)})
            self._reply(200, {"probs": probs.tolist()})

        def log_message(self, fmt, *args):  # keep request logs off stderr unless asked
            if os.environ.get("COMAL_JUDGE_SERVE_VERBOSE"):
                super().log_message(fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_judge_args(parser)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=5000, help="Port (0 picks a free one)")
    parser.add_argument(
        "--token", type=str, default=os.environ.get("COMAL_JUDGE_TOKEN"), help="Bearer token required by POST /prob"
    )
    args = parser.parse_args(argv)
    judge_cfg = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("judge.")}
    judge = build_judge(judge_cfg)
    server = make_server(judge, args.host, args.port, args.token)
    host, port = server.server_address[:2]
    print(f"serving judge {judge.name} on http://{host}:{port}/prob", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
