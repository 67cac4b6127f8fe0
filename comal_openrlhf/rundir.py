"""The directories of one training run: who holds them, and what a fresh run does where an earlier run left files.

A run writes DeepSpeed checkpoints to ``--ckpt.path``, its COMAL state (iteration records, anchors) to
``<ckpt.path>_comal`` and its history ``comal_iterations.jsonl`` plus the final model to ``--ckpt.output_dir``.

- Lock: the first run holds ``<ckpt.path>_comal/run.lock`` and ``<ckpt.output_dir>/.comal_run.lock`` (pid, host,
  start time) until it exits; a second run sharing either folder is refused, naming the holder. A lock whose process
  is gone (same host, pid not running) is reported and taken over, so a run killed by SIGKILL or the OOM killer can
  be resumed; a lock from another host cannot be checked and is refused with the path to delete.
- Fresh run (no ``--ckpt.load_enable``, or nothing to load) into directories that hold an earlier run's history,
  state or checkpoints: refused, naming what is there and the ways out (resume it, new directories, or
  ``--comal.overwrite``, which moves the old files aside as ``*.old-TIME`` and says so). Appending to the old
  history would list iterations twice; mixing checkpoints would make a later resume pick the wrong one.
"""

import json
import os
import socket
import time

from comal_openrlhf.errors import PlanError, RunLockError

HISTORY = "comal_iterations.jsonl"
OUTPUT_LOCK = ".comal_run.lock"


def pid_alive(pid):
    """Whether a process of this id exists on this host (signal 0; one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirectory:
    def __init__(self, ckpt_path, output_dir, is_rank_0=True):
        self.ckpt_path = ckpt_path.rstrip("/")
        self.state_dir = self.ckpt_path + "_comal"
        self.output_dir = output_dir
        self.history_path = os.path.join(output_dir, HISTORY)
        self.lock_path = os.path.join(self.state_dir, "run.lock")
        self.is_rank_0 = is_rank_0
        self.held = []  # lock files this process holds

    # ----------------------------------------------------------------------- lock
    def lock(self, say=print):
        """Take the run lock of every folder the run writes (rank 0): ``<ckpt.path>_comal/run.lock`` and
        ``<ckpt.output_dir>/.comal_run.lock``. Raises RunLockError while another live process holds either (and then
        holds neither itself)."""
        try:
            for path, flag in self.lock_paths():
                self._take(path, flag, say)
        except BaseException:
            self.unlock()
            raise

    def lock_paths(self):
        paths = [(self.lock_path, f"--ckpt.path {self.ckpt_path}")]
        out = os.path.join(self.output_dir, OUTPUT_LOCK)
        if os.path.abspath(os.path.dirname(out)) != os.path.abspath(self.state_dir):
            paths.append((out, f"--ckpt.output_dir {self.output_dir}"))
        return paths

    def _take(self, lock_path, flag, say):
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder(lock_path)
                if holder is None:
                    continue  # released between our attempt and the read
                if holder.get("host") != me["host"]:
                    raise RunLockError(
                        f"{lock_path} is held by process {holder.get('pid')} on host {holder.get('host')} "
                        f"(since {holder.get('started')}); another run is using {flag}. If that run is gone, delete "
                        "the lock file; else use another folder"
                    ) from None
                if pid_alive(int(holder.get("pid", -1))):
                    raise RunLockError(
                        f"another run (process {holder['pid']}, since {holder.get('started')}) is using {flag} "
                        f"(lock {lock_path}); wait for it to finish or use another folder"
                    ) from None
                say(
                    f"[comal] taking over a stale lock {lock_path}: process {holder.get('pid')} "
                    f"(started {holder.get('started')}) is no longer running"
                )
                os.remove(lock_path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held.append(lock_path)
            return
        raise RunLockError(f"could not take the lock {lock_path}")

    @staticmethod
    def _holder(lock_path):
        try:
            with open(lock_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": socket.gethostname(), "started": "unknown (unreadable lock file)"}

    def unlock(self):
        for path in reversed(self.held):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.held = []

    # ------------------------------------------------------------------ fresh run
    def earlier_run(self):
        """What an earlier run left here: a list of (path, description)."""
        found = []
        if os.path.isfile(self.history_path) and os.path.getsize(self.history_path) > 0:
            with open(self.history_path) as f:
                n = sum(1 for line in f if line.strip())
            found.append((self.history_path, f"a history of {n} finished iteration(s)"))
        if os.path.isdir(self.state_dir):
            state = [f for f in os.listdir(self.state_dir) if f != "run.lock"]
            if state:
                found.append((self.state_dir, f"COMAL state ({', '.join(sorted(state)[:4])}...)"))
        if os.path.isdir(self.ckpt_path) and os.listdir(self.ckpt_path):
            found.append((self.ckpt_path, "DeepSpeed checkpoints"))
        return found

    def prepare_fresh(self, overwrite=False, say=print):
        """Before a fresh run: refuse where an earlier run left files, or with ``overwrite`` move them aside."""
        found = self.earlier_run()
        if not found:
            return
        listing = "; ".join(f"{path}: {what}" for path, what in found)
        if not overwrite:
            raise PlanError(
                f"a fresh run would mix with an earlier run: {listing}. Resume it with --ckpt.load_enable, start in "
                "new directories (--ckpt.path and --ckpt.output_dir), or pass --comal.overwrite to move the earlier "
                "run's files aside"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path, _ in found:
            if path == self.state_dir:  # keep the lock this run holds
                aside = f"{path}.old-{stamp}"
                os.makedirs(aside, exist_ok=True)
                for name in os.listdir(path):
                    if name != "run.lock":
                        os.replace(os.path.join(path, name), os.path.join(aside, name))
            else:
                root, ext = os.path.splitext(path)
                aside = f"{root}.old-{stamp}{ext}"
                os.replace(path, aside)
            say(f"[comal] --comal.overwrite: moved {path} to {aside}")
