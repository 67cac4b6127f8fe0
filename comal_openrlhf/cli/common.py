"""Shared pieces of the project's command lines: ``--json`` output that is one JSON object on stdout, nothing else.

Libraries print to stdout on their own (DeepSpeed's "[WARNING] ... Setting accelerator to CPU" at import time, C
extensions, child processes that inherit the descriptor), so redirecting Python's ``sys.stdout`` is not enough:
``json_stdout`` points file descriptor 1 at descriptor 2 (``os.dup2``) while the command works, and puts it back
for the one final JSON print::

    with json_stdout(args.json) as emit:
        result = work()          # every print, from any library or child process, lands on stderr
        emit(result)             # stdout: exactly one line, json.dumps(result)
"""

import contextlib
import json
import os
import sys


class _Redirect:
    """fd 1 -> fd 2 and ``sys.stdout`` -> ``sys.stderr`` until ``restore``."""

    def __init__(self):
        self.saved_fd = None
        self.saved_stdout = sys.stdout
        _flush(sys.stdout)
        try:
            self.saved_fd = os.dup(1)
            os.dup2(2, 1)
        except OSError:  # no usable descriptor 1 (a detached process): only the Python-level redirect applies
            self.saved_fd = None
        sys.stdout = sys.stderr

    def restore(self):
        if self.saved_stdout is None:
            return
        _flush(sys.stderr)
        _flush(self.saved_stdout)  # bytes a library buffered on the old object belong to stderr too
        if self.saved_fd is not None:
            os.dup2(self.saved_fd, 1)
            os.close(self.saved_fd)
            self.saved_fd = None
        sys.stdout, self.saved_stdout = self.saved_stdout, None


def _flush(stream):
    try:
        stream.flush()
    except (AttributeError, ValueError, OSError):
        pass


@contextlib.contextmanager
def json_stdout(enabled=True):
    """While the block runs, everything written to stdout goes to stderr (when ``enabled``); yields ``emit(obj)``,
    which restores stdout and prints ``json.dumps(obj)`` as its only line. Stdout is restored when the block ends,
    also on an exception. With ``enabled`` False nothing is redirected and ``emit`` still prints the JSON line."""
    redirect = _Redirect() if enabled else None

    def emit(obj, **dumps_kwargs):
        if redirect is not None:
            redirect.restore()
        sys.stdout.write(json.dumps(obj, **dumps_kwargs) + "\n")
        sys.stdout.flush()

    try:
        yield emit
    finally:
        if redirect is not None:
            redirect.restore()


def run_command(work, as_json=False, to_json=None):
    """The body of a command line's ``main``: apply the CPU runtime, run ``work()``, turn a typed error of the
    library (``COMALError``) into one ``error: ...`` line on stderr and exit status 2, and with ``as_json`` print the
    result (through ``to_json`` when given) as the one JSON object on stdout. Returns the result."""
    from comal_openrlhf import cpu_runtime
    from comal_openrlhf.errors import COMALError

    with json_stdout(as_json) as emit:
        cpu_runtime.apply()
        try:
            result = work()
        except COMALError as e:
            print(f"[comal] error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if as_json:
            emit(to_json(result) if to_json else result)
    return result
