"""Helpers shared by the test modules (tests/ is on sys.path through conftest.py)."""

import json
import os
import signal
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def run_cmd(cmd, cwd, timeout=600, env=None):
    """Run a launch command; on failure show its output tail (so a CI log names the cause)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-6000:]
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return p


def kill_at_line(cmd, cwd, marker, timeout=600):
    """Launch cmd, SIGKILL it as soon as a line of its output contains marker, and return that output. Fails, showing
    the output's tail, if the process ends before the marker or outlives the kill."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, f"ended ({proc.returncode}) before {marker!r}:\n{out[-3000:]}"
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc):
    # a concrete free port: torch 2.13's launcher hands "--master_port 0" to the workers unchanged (they hang)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]


def read_scalars(logdir, tag):
    """All values of one scalar tag from the TensorBoard event files under logdir, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return [v for _s, v in sorted(values)]
