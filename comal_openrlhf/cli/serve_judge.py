"""Host any judge over HTTP (the pairwise protocol of ``judges/remote.py``), e.g. a judge model on its own GPU.

    python -m comal_openrlhf.cli.serve_judge --judge.kind reward_model --judge.path /models/rm --port 5000
    python -m comal_openrlhf.cli.serve_judge --judge.kind gpm --judge.path /models/gpm --port 5000
    python -m comal_openrlhf.cli.serve_judge --judge.kind table --judge.table paper --port 0 --token SECRET

Endpoints:
    POST /prob    {"prompts": [...], "responses_a": [...], "responses_b": [...]} -> {"probs": [...]}
    GET  /health  -> {"status": "ok", "judge": NAME}

Served as a FastAPI app under uvicorn, as OpenRLHF's own reward server (openrlhf/cli/serve_rm.py): uvicorn's
logging and access log, a listen backlog of ``--backlog`` (2048) connections, requests parsed on the event loop and
judged in a worker thread, one judge call at a time (model judges are not thread-safe). FastAPI and uvicorn come
with the optional ``serve`` extra (``pip install comal-openrlhf[serve]``); without them (or with
``--backend stdlib``) the standard library's threading server is the fallback, with the same endpoints and the same
backlog.

Binds 127.0.0.1 unless --host says otherwise. With --token (or $COMAL_JUDGE_TOKEN) POST /prob needs
``Authorization: Bearer TOKEN`` (401 otherwise). Malformed requests get 400, judge failures 500, both with
{"error": ...}. Clients: ``--judge.kind remote --judge.url http://HOST:PORT/prob``.
"""

import argparse
import hmac
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from comal_openrlhf.cli.common import run_command
from comal_openrlhf.errors import PlanError
from comal_openrlhf.judges import JudgeError, add_judge_args, build_judge

MAX_BODY_BYTES = 256 * 1024 * 1024
BACKLOG = 2048  # pending connections the listening socket holds (uvicorn's default; socketserver's is 5)
BACKENDS = ("auto", "fastapi", "stdlib")


class BadRequest(ValueError):
    pass


def _parse_request(raw):
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"malformed request: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("malformed request: body must be a JSON object")
    fields = [body.get(k) for k in ("prompts", "responses_a", "responses_b")]
    for key, value in zip(("prompts", "responses_a", "responses_b"), fields):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise BadRequest(f"malformed request: {key!r} must be a list of strings")
    if not len(fields[0]) == len(fields[1]) == len(fields[2]):
        raise BadRequest("malformed request: prompts, responses_a and responses_b must have the same length")
    return fields


def _content_length(value):
    try:
        length = int(value if value is not None else "")
    except ValueError:
        raise BadRequest(f"malformed request: Content-Length {value!r} is not a number") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise BadRequest(f"malformed request: Content-Length {length} out of range [0, {MAX_BODY_BYTES}]")
    return length


def _authorised(token, header):
    return not token or hmac.compare_digest(header or "", f"Bearer {token}")


class _Handler:
    """What both backends do with a request: (status, JSON object)."""

    def __init__(self, judge, token):
        self.judge, self.token = judge, token
        self.lock = threading.Lock()  # one judge call at a time: model judges are not thread-safe

    def health(self):
        return 200, {"status": "ok", "judge": self.judge.name}

    def prob(self, raw):
        try:
            prompts, a, b = _parse_request(raw)
        except BadRequest as e:
            return 400, {"error": str(e)}
        try:
            with self.lock:
                probs = self.judge.prob(prompts, a, b)
        except JudgeError as e:
            return 500, {"error": str(e)}
        return 200, {"probs": probs.tolist()}


def fastapi_available():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def make_app(judge, token=None):
    """The FastAPI app serving ``judge`` (needs the ``serve`` extra)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    handler = _Handler(judge, token)
    app = FastAPI(title="comal-openrlhf judge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse(
            {"error": f"{exc.detail}: {request.method} {request.url.path}; use POST /prob or " "GET /health"},
            status_code=exc.status_code,
        )

    @app.get("/health")
    async def health():
        code, obj = handler.health()
        return JSONResponse(obj, status_code=code)

    @app.post("/prob")
    async def prob(request: Request):
        if not _authorised(token, request.headers.get("authorization")):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        try:
            _content_length(request.headers.get("content-length"))
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        raw = await request.body()
        code, obj = await run_in_threadpool(handler.prob, raw)  # the judge runs off the event loop
        return JSONResponse(obj, status_code=code)

    return app


def make_server(judge, host="127.0.0.1", port=0, token=None, backlog=BACKLOG):
    """The standard-library fallback: a ThreadingHTTPServer serving ``judge``; call ``serve_forever()`` (port 0
    picks a free port)."""
    handler = _Handler(judge, token)

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
                self._reply(*handler.health())
            else:
                self._reply(404, {"error": f"unknown path {self.path}; use POST /prob or GET /health"})

        def do_POST(self):
            if self.path.rstrip("/") != "/prob":
                return self._reply(404, {"error": f"unknown path {self.path}; use POST /prob"})
            if not _authorised(token, self.headers.get("Authorization")):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            try:
                length = _content_length(self.headers.get("Content-Length"))
            except BadRequest as e:
                return self._reply(400, {"error": str(e)})
            self._reply(*handler.prob(self.rfile.read(length)))

        def log_message(self, fmt, *args):  # keep request logs off stderr unless asked
            if os.environ.get("COMAL_JUDGE_SERVE_VERBOSE"):
                super().log_message(fmt, *args)

    class Server(ThreadingHTTPServer):
        request_queue_size = backlog
        daemon_threads = True

    return Server((host, port), Handler)


def bind(host, port, backlog=BACKLOG):
    """A listening TCP socket (port 0 picks a free one), for uvicorn's ``sockets=``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def make_uvicorn_server(judge, host="127.0.0.1", port=0, token=None, backlog=BACKLOG, log_level="info"):
    """(uvicorn.Server, bound socket): run with ``server.run(sockets=[sock])`` (a thread is fine)."""
    import uvicorn

    sock = bind(host, port, backlog)
    config = uvicorn.Config(
        make_app(judge, token), log_level=log_level, backlog=backlog, timeout_keep_alive=30, lifespan="off"
    )
    return uvicorn.Server(config), sock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_judge_args(parser)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=5000, help="Port (0 picks a free one)")
    parser.add_argument(
        "--token", type=str, default=os.environ.get("COMAL_JUDGE_TOKEN"), help="Bearer token required by POST /prob"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="fastapi (uvicorn, the 'serve' extra), stdlib (http.server), auto: fastapi when installed",
    )
    parser.add_argument("--backlog", type=int, default=BACKLOG, help="Pending connections the socket holds")
    parser.add_argument("--log_level", default="info", help="uvicorn log level (fastapi backend)")
    args = parser.parse_args(argv)
    run_command(lambda: _serve(args))  # a typed error (a bad judge, a port in use): one line, exit 2


def _serve(args):
    backend = args.backend
    if backend == "auto":
        backend = "fastapi" if fastapi_available() else "stdlib"
    elif backend == "fastapi" and not fastapi_available():
        raise PlanError("--backend fastapi needs FastAPI and uvicorn: pip install 'comal-openrlhf[serve]'")
    judge_cfg = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("judge.")}
    judge = build_judge(judge_cfg)
    try:
        served = _start(backend, judge, args)
    except OSError as e:  # e.g. the port is taken
        raise PlanError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    served()


def _start(backend, judge, args):
    """Bind the listening socket now (a bind error surfaces here) and return the function that serves."""
    if backend == "fastapi":
        server, sock = make_uvicorn_server(judge, args.host, args.port, args.token, args.backlog, args.log_level)
        return lambda: _serve_uvicorn(server, sock, judge)
    server = make_server(judge, args.host, args.port, args.token, args.backlog)
    return lambda: _serve_stdlib(server, judge, args.backend)


def _serve_uvicorn(server, sock, judge):
    host, port = sock.getsockname()[:2]
    print(f"serving judge {judge.name} on http://{host}:{port}/prob", flush=True)  # the URL ends the line
    print("[serve] backend: FastAPI under uvicorn", file=sys.stderr, flush=True)
    server.run(sockets=[sock])


def _serve_stdlib(server, judge, asked):
    host, port = server.server_address[:2]
    print(f"serving judge {judge.name} on http://{host}:{port}/prob", flush=True)
    why = "FastAPI/uvicorn not installed" if asked == "auto" else "--backend stdlib"
    print(f"[serve] backend: the stdlib http.server fallback ({why})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
