#!/usr/bin/env python
"""Replay the fault cases a new user hit against the commands, each as a subprocess, and check what they
promise: the exit status (2 for a user error, 0 where the input is valid), exactly one error line (``[comal] error:``
for the package's commands, the script's own prefix elsewhere), no ``Traceback`` anywhere in the output, and, where a
refused run must not lose anything, that the files an earlier run wrote are intact.

    python scripts/probe_faults.py                      # every case, a table, exit 1 if a case fails
    python scripts/probe_faults.py --only shared_output_dir --only negative_lr
    python scripts/probe_faults.py --json               # one JSON object on stdout (the table goes to stderr)
    python scripts/probe_faults.py --list               # the cases and what each checks

Everything is built in a temporary folder (removed at the end unless ``--keep``): a tiny local Llama whose words
include the paper game's options a, b, c (``comal_openrlhf.tiny.build_tiny_llama``), pair files, a prompts file.
Each training case is one iteration of a few pairs at ``--data.max_len 64``; the cases run on a pool of ``--jobs``
threads (default 2). Servers bind loopback addresses only.

A case the code does not handle yet carries an ``xfail`` reason: it is still run and reported (``xfail`` when it
fails as expected, ``XPASS`` when it passes: then the mark should go), and does not fail the probe. A case that
cannot be set up on this machine (a read-only folder needs a non-root user, or root with ``unshare`` and ``mount``)
is reported ``skipped``.
"""

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "[comal] error:"
PY = sys.executable
ROW = {"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"}
TRAIN_TIMEOUT = 300  # seconds; a tiny one-iteration run takes ~10-20 s here, more on a loaded machine
TRAIN_FLAGS = [
    "--train.micro_batch_size", "2",
    "--train.batch_size", "4",
    "--adam.lr", "1e-3",
    "--train.max_epochs", "1",
    "--model.beta", "1.0",
    "--data.prompt_key", "prompt",
    "--data.max_len", "64",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ processes


class Proc:
    """What one command did: exit status (None when killed on its timeout), stdout + stderr, seconds."""

    def __init__(self, cmd, rc, out, seconds, timed_out):
        self.cmd, self.rc, self.out, self.seconds, self.timed_out = cmd, rc, out, seconds, timed_out


def launch(cmd, cwd, timeout, env=None):
    """Run ``cmd`` in its own process group; on ``timeout`` kill that group (this command and its children only)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    t0 = time.time()
    p = subprocess.Popen(
        [str(x) for x in cmd],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        timed_out = True
    return Proc(
        cmd, None if timed_out else p.returncode, (out or "") + "\n" + (err or ""), time.time() - t0, timed_out
    )


def error_lines(text, prefixes):
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith(tuple(prefixes))]


def traceback_summary(text):
    """The exception line that ends the first traceback in ``text`` (for the report)."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if "Traceback" in line)
    for line in lines[i + 1 :]:
        if line and not line.startswith((" ", "\t", "Traceback")):
            return line.strip()[:200]
    return lines[i].strip()[:200]


class Check:
    """The verdict of one case: the problems found, the exit status and error line shown in the table."""

    def __init__(self, expected):
        self.expected = expected
        self.problems = []
        self.exit = None
        self.error_line = None
        self.tail = ""
        self.skipped = None

    def problem(self, text):
        self.problems.append(text)

    def process(self, p, expect=2, contains=(), absent=(), prefixes=(PREFIX,), what=""):
        """Exit status ``expect``; for a refusal exactly one line starting with one of ``prefixes`` that matches each
        regex of ``contains`` and holds none of the strings ``absent``; for ``expect`` 0 no such line; never a
        traceback."""
        tag = f"{what}: " if what else ""
        self.exit = p.rc
        self.tail = p.out[-2500:]
        if p.timed_out:
            self.problem(f"{tag}still running after {p.seconds:.0f} s (killed)")
        elif p.rc != expect:
            self.problem(f"{tag}exit {p.rc}, expected {expect}")
        if "Traceback" in p.out:
            self.problem(f"{tag}a traceback in the output ({traceback_summary(p.out)})")
        lines = error_lines(p.out, prefixes)
        if expect == 0:
            if lines:
                self.problem(f"{tag}an error line in a run that must succeed: {lines[0][:200]}")
            return
        if len(lines) != 1:
            self.problem(f"{tag}{len(lines)} lines starting with {' or '.join(map(repr, prefixes))}, expected 1")
        if lines:
            self.error_line = lines[0]
            for pattern in contains:
                if not re.search(pattern, lines[0]):
                    self.problem(f"{tag}the error line does not match {pattern!r}")
            for text in absent:
                if text in lines[0]:
                    self.problem(f"{tag}the error line says {text!r}")


# ----------------------------------------------------------------------------------------------- inputs


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def pairs_dir(path, iterations=1, rows=None):
    os.makedirs(path, exist_ok=True)
    for k in range(iterations):
        write_jsonl(os.path.join(path, f"iter_{k:03d}.jsonl"), rows or [ROW] * 4)
    return str(path)


class Inputs:
    """What every case shares, built once in ``root``: a tiny model (words include a, b, c), pair files, prompts."""

    def __init__(self, root):
        from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

        self.root = root
        self.model = build_tiny_llama(os.path.join(root, "model"), words=tuple(DEFAULT_WORDS) + ("b", "c"))
        self.pairs = pairs_dir(os.path.join(root, "pairs"), 2)
        self.prompts = write_jsonl(os.path.join(root, "prompts.jsonl"), [{"prompt": ROW["prompt"]}])
        self.empty = os.path.join(root, "empty.jsonl")
        open(self.empty, "w").close()

    def train(self, d, *extra, pairs=True, iterations=1):
        """A train_comal launch into the case folder ``d`` (offline source of one iteration unless told)."""
        cmd = [PY, "-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", self.model, *TRAIN_FLAGS]
        cmd += ["--ckpt.path", os.path.join(d, "ckpt"), "--ckpt.output_dir", os.path.join(d, "final")]
        if pairs:
            cmd += ["--comal.pairs_dir", self.pairs, "--comal.iterations", str(iterations)]
        return cmd + [str(x) for x in extra]


def replace_flag(cmd, flag, value):
    cmd = list(cmd)
    cmd[cmd.index(flag) + 1] = str(value)
    return cmd


def read_only_prefix(folder):
    """A command prefix under which ``folder`` is read-only, or None where this machine cannot make one. A non-root
    user gets mode 0500; root ignores mode bits, so the command runs in its own mount namespace (``unshare -m``) with
    ``folder`` bind-mounted read-only there: nothing outside that process sees the mount, nothing is left mounted."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o500)
        return [] if not os.access(folder, os.W_OK) else None
    if not (shutil.which("unshare") and shutil.which("mount")):
        return None
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, "sh", folder]
    test = subprocess.run(prefix + ["sh", "-c", 'touch "$0/.probe" 2>/dev/null && exit 1 || exit 0', folder])
    return prefix if test.returncode == 0 and not os.path.exists(os.path.join(folder, ".probe")) else None


def history(d):
    path = os.path.join(d, "final", "comal_iterations.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def non_finite_numbers(obj, where=""):
    """Paths of the NaN / inf numbers in a JSON value (json.loads reads NaN and Infinity tokens as floats)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "."]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_numbers(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in non_finite_numbers(v, f"{where}[{i}]")]
    return []


# ------------------------------------------------------------------------------------------------ the cases

CASES = {}


def case(name, expected, xfail=None, slow=False):
    """Register ``fn(inputs, folder) -> Check`` as case ``name``; ``expected`` is shown in the table; ``xfail`` is the
    reason the case is known to fail; ``slow`` cases (two launches or a training run) are started first."""

    def register(fn):
        CASES[name] = {"fn": fn, "expected": expected, "xfail": xfail, "slow": slow, "doc": (fn.__doc__ or "").strip()}
        return fn

    return register


@case("empty_dataset", "exit 2, names the file")
def _empty_dataset(inp, d):
    """An empty --data.dataset file (static source): refused before anything loads, naming the flag and file."""
    c = Check("2")
    p = launch(inp.train(d, "--comal.source", "static", "--data.dataset", inp.empty, pairs=False), d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--data\.dataset \S*empty\.jsonl: the file is empty"])
    return c


@case("missing_dataset", "exit 2, names the file")
def _missing_dataset(inp, d):
    """A --data.dataset file that does not exist."""
    c = Check("2")
    missing = os.path.join(d, "missing.jsonl")
    p = launch(inp.train(d, "--comal.source", "static", "--data.dataset", missing, pairs=False), d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--data\.dataset \S*missing\.jsonl: no such file"])
    return c


@case("batch_not_divisible", "exit 2, names the flags")
def _batch_not_divisible(inp, d):
    """--train.batch_size 5 with --train.micro_batch_size 2 on one rank: 5 is no multiple of 2 x 1."""
    c = Check("2")
    p = launch(replace_flag(inp.train(d), "--train.batch_size", 5), d, TRAIN_TIMEOUT)
    c.process(
        p, contains=[r"--train\.batch_size 5 must be a multiple of --train\.micro_batch_size 2 x 1 data-parallel"]
    )
    return c


@case(
    "batch_not_divisible_torchrun",
    "exit 2, one line",
    xfail="each rank prints the error line (2 lines for 2 ranks) and torchrun's elastic agent then prints its own "
    "ChildFailedError traceback and exits 1",
)
def _batch_not_divisible_torchrun(inp, d):
    """--train.batch_size 2 with --train.micro_batch_size 2 on 2 ranks (torchrun): 2 is no multiple of 2 x 2. Every
    rank refuses it; the user should see the message once, and no traceback."""
    c = Check("2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launcher += ["--master_port", str(port)]
    cmd = launcher + replace_flag(inp.train(d), "--train.batch_size", 2)[1:]  # torchrun ... -m openrlhf.cli...
    p = launch(cmd, d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--train\.batch_size 2 must be a multiple of .* 2 data-parallel rank\(s\) = 4"])
    return c


@case("batch_zero", "exit 2, names the flag")
def _batch_zero(inp, d):
    """--train.batch_size 0."""
    c = Check("2")
    p = launch(replace_flag(inp.train(d), "--train.batch_size", 0), d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--train\.batch_size must be an integer >= 1, got 0"])
    return c


@case("negative_lr", "exit 2, names the flag")
def _negative_lr(inp, d):
    """A negative --adam.lr typed with a space, ``--adam.lr -1e-5`` (argparse alone reads "-1e-5" as an option;
    train_comal joins it to its flag), reaching the check that names the flag and its rule."""
    c = Check("2")
    cmd = inp.train(d)
    i = cmd.index("--adam.lr")
    cmd[i + 1] = "-1e-5"
    p = launch(cmd, d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--adam\.lr must be a finite number >= 0, got -1e-05"])
    return c


@case("label_smoothing", "exit 2, names the flag")
def _label_smoothing(inp, d):
    """--model.label_smoothing 1.5."""
    c = Check("2")
    p = launch(inp.train(d, "--model.label_smoothing", "1.5"), d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--model\.label_smoothing must be in \[0, 0\.5\), got 1\.5"])
    return c


@case("negative_temperature", "exit 2, names the flag")
def _negative_temperature(inp, d):
    """A negative --rollout.temperature with an online source (table judge, prompts file)."""
    c = Check("2")
    cmd = inp.train(d, "--comal.source", "online", "--judge.kind", "table", "--judge.table", "paper", pairs=False)
    cmd += ["--data.dataset", inp.prompts, "--rollout.temperature", "-0.5"]
    c.process(launch(cmd, d, TRAIN_TIMEOUT), contains=[r"--rollout\.temperature must be a number > 0.*got -0\.5"])
    return c


@case("missing_model", "exit 2, names the folder")
def _missing_model(inp, d):
    """A --model.model_name_or_path folder that does not exist."""
    c = Check("2")
    p = launch(replace_flag(inp.train(d), "--model.model_name_or_path", os.path.join(d, "no_such_model")), d, 300)
    c.process(p, contains=[r"--model\.model_name_or_path \S*no_such_model: no such folder"])
    return c


@case("huge_pair_weight", "exit 0, finite history", slow=True)
def _huge_pair_weight(inp, d):
    """A pair weight of 1e308 in an offline pairs file: the weights are normalised without overflow, so the run
    trains (exit 0) and its history holds finite numbers only."""
    c = Check("0")
    rows = [{**ROW, "weight": 1e308}, ROW, {**ROW, "weight": 1e308}, ROW]
    pairs = pairs_dir(os.path.join(d, "pairs"), 1, rows)
    cmd = replace_flag(inp.train(d), "--comal.pairs_dir", pairs)
    c.process(launch(cmd, d, TRAIN_TIMEOUT), expect=0)
    try:
        h = history(d)
    except (OSError, ValueError) as e:
        c.problem(f"no readable history: {e}")
        return c
    if [r.get("iteration") for r in h] != [0]:
        c.problem(f"history iterations {[r.get('iteration') for r in h]}, expected [0]")
    bad = non_finite_numbers(h)
    if bad:
        c.problem(f"non-finite numbers in the history: {bad[:5]}")
    if not any(isinstance(v, (int, float)) and "loss" in k for r in h for k, v in r.items()):
        c.problem("no loss recorded in the history")
    return c


def _read_only_case(inp, d, flag):
    c = Check("2")
    ro = os.path.join(d, "ro")
    os.makedirs(ro)
    prefix = read_only_prefix(ro)
    if prefix is None:
        c.skipped = "cannot make a read-only folder here (root without unshare/mount, or a user that writes anyway)"
        return c
    try:
        cmd = replace_flag(inp.train(d), flag, ro)
        c.process(launch(prefix + cmd, d, TRAIN_TIMEOUT), contains=[re.escape(f"{flag} {ro} is not writable")])
    finally:
        os.chmod(ro, 0o700)
    if os.listdir(ro):
        c.problem(f"files appeared in the read-only folder: {os.listdir(ro)}")
    return c


@case("read_only_ckpt_path", "exit 2, names the flag")
def _read_only_ckpt_path(inp, d):
    """A read-only --ckpt.path: refused before any model loads, naming the flag and the folder."""
    return _read_only_case(inp, d, "--ckpt.path")


@case("read_only_output_dir", "exit 2, names the flag")
def _read_only_output_dir(inp, d):
    """A read-only --ckpt.output_dir."""
    return _read_only_case(inp, d, "--ckpt.output_dir")


@case("shared_output_dir", "run 1: 0; run 2: 2, history once", slow=True)
def _shared_output_dir(inp, d):
    """Two runs sharing --ckpt.output_dir with different --ckpt.path: the first trains 2 iterations, the second is
    refused (a fresh run would mix with the first's history), and the history still lists each iteration once,
    unchanged."""
    c = Check("0, then 2")
    first = inp.train(d, iterations=2)
    c.process(launch(first, d, TRAIN_TIMEOUT), expect=0, what="first run")
    if c.problems:
        return c
    path = os.path.join(d, "final", "comal_iterations.jsonl")
    with open(path, "rb") as f:
        before = f.read()
    second = replace_flag(first, "--ckpt.path", os.path.join(d, "ckpt_other"))
    c.process(
        launch(second, d, TRAIN_TIMEOUT),
        contains=[r"a fresh run would mix with an earlier run", r"history of 2 finished iteration"],
        what="second run",
    )
    with open(path, "rb") as f:
        after = f.read()
    if after != before:
        c.problem("the first run's comal_iterations.jsonl changed")
    iterations = [r.get("iteration") for r in history(d)]
    if iterations != [0, 1]:
        c.problem(f"history iterations {iterations}, expected [0, 1] (each once)")
    return c


@case(
    "serve_judge_port_in_use",
    "exit 2, names the port",
)
def _serve_judge_port_in_use(inp, d):
    """serve_judge on a 127.0.0.1 port another socket already listens on: one error line naming the port, no
    traceback (and no server left running: the probe kills it after 60 s otherwise)."""
    c = Check("2")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cmd = [PY, "-m", "comal_openrlhf.cli.serve_judge", "--judge.kind", "table", "--judge.table", "paper"]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        p = launch(cmd, d, 60)
    c.process(p, contains=[str(port)])
    return c


@case(
    "kernels_bench_bad_shape",
    "exit 2, names the shape",
)
def _kernels_bench_bad_shape(inp, d):
    """``python benchmarks/kernels_bench.py --shapes 10xZ``: a usage error naming the shape (argparse's
    ``kernels_bench.py: error:`` or the package's prefix), before anything is measured."""
    c = Check("2")
    cmd = [PY, os.path.join(REPO, "benchmarks", "kernels_bench.py"), "--shapes", "10xZ", "--out", os.path.join(d, "b")]
    c.process(launch(cmd, d, 120), contains=[r"10xZ"], prefixes=(PREFIX, "kernels_bench.py: error:"))
    return c


@case("static_with_pairs_dir", "exit 2, no 'give --comal.pairs_dir'")
def _static_with_pairs_dir(inp, d):
    """--comal.source static together with --comal.pairs_dir (and no --data.dataset): the message must say that the
    static source reads --data.dataset, not tell the user to give the --comal.pairs_dir they gave."""
    c = Check("2")
    p = launch(inp.train(d, "--comal.source", "static"), d, TRAIN_TIMEOUT)
    c.process(p, contains=[r"--comal\.source static", r"--data\.dataset"], absent=["give --comal.pairs_dir"])
    return c


@case("evaluate_exact_no_template", "exit 2, names the label")
def _evaluate_exact_no_template(inp, d):
    """evaluate's exact mode on the demo's game (the paper table, prompt "question pick one ?") without
    --data.apply_chat_template, on a tiny model whose words include the labels: "?a" is no token sequence of
    prompt + label, so the option log-probs are not the labels'. An error naming the label, never a report (the
    win rate came out above 1 before)."""
    c = Check("2")
    out = os.path.join(d, "ev")
    cmd = [PY, "-m", "comal_openrlhf.cli.evaluate", "--policies", f"skew={inp.model}", f"nash={inp.model}"]
    cmd += ["--data.dataset", inp.prompts, "--data.prompt_key", "prompt", "--judge.kind", "table"]
    cmd += ["--judge.table", "paper", "--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "3"]
    cmd += ["--eval.exploit_m", "0", "--eval.bootstrap", "50", "--out", out, "--json"]
    p = launch(cmd, d, 300)
    c.process(p, contains=[r"exact mode: option 'a'", r"--data\.apply_chat_template"])
    if os.path.exists(os.path.join(out, "results.json")):
        c.problem("a results.json was written")
    if p.out.lstrip().startswith("{"):
        c.problem("a JSON report was printed")
    return c


@case("generate_rerun_other_checkpoint", "run 1: 0; run 2: 2, rows unchanged", slow=True)
def _generate_rerun_other_checkpoint(inp, d):
    """generate into --output, then again into the same --output with another checkpoint under the same
    --policy_id: refused (samples of another checkpoint are never mixed in), the old rows byte for byte unchanged."""
    c = Check("0, then 2")
    other = os.path.join(d, "other_model")
    shutil.copytree(inp.model, other)
    output = os.path.join(d, "samples.jsonl")
    cmd = [PY, "-m", "comal_openrlhf.cli.generate", "--model.model_name_or_path", inp.model, "--policy_id", "mu"]
    cmd += ["--data.dataset", inp.prompts, "--data.prompt_key", "prompt", "--data.max_len", "64"]
    cmd += ["--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "3", "--output", output, "--json"]
    c.process(launch(cmd, d, 300), expect=0, what="first run")
    if c.problems:
        return c
    with open(output, "rb") as f:
        before = f.read()
    if len(before.splitlines()) != 2:
        c.problem(f"first run wrote {len(before.splitlines())} rows, expected 2")
    p = launch(replace_flag(cmd, "--model.model_name_or_path", other), d, 300)
    c.process(p, contains=[r"made by another checkpoint or other sampling settings"], what="second run")
    with open(output, "rb") as f:
        if f.read() != before:
            c.problem("the rows of the first run changed")
    return c


# ------------------------------------------------------------------------------------------------- running


def run_case(name, inp, root):
    spec = CASES[name]
    d = os.path.join(root, name)
    os.makedirs(d)
    t0 = time.time()
    try:
        c = spec["fn"](inp, d)
    except Exception as e:  # noqa: BLE001 - a probe that breaks is a failed case, reported with its cause
        c = Check(spec["expected"])
        c.problem(f"the probe itself failed: {type(e).__name__}: {e}")
    passed = not c.problems and c.skipped is None
    if c.skipped is not None:
        status = "skipped"
    elif spec["xfail"]:
        status = "XPASS" if passed else "xfail"
    else:
        status = "pass" if passed else "FAIL"
    return {
        "case": name,
        "status": status,
        "ok": status != "FAIL",
        "passed": passed,
        "exit": c.exit,
        "expected": spec["expected"],
        "error_line": c.error_line,
        "problems": c.problems,
        "xfail": spec["xfail"],
        "skipped": c.skipped,
        "seconds": round(time.time() - t0, 1),
        "output_tail": "" if passed else c.tail,
    }


def table(results):
    head = ("case", "exit", "expected", "ok", "s")
    rows = [(r["case"], str(r["exit"]), r["expected"], r["status"], f"{r['seconds']:.0f}") for r in results]
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for r in results:
        for problem in r["problems"]:
            notes.append(f"  {r['case']}: {problem}")
        if r["status"] in ("xfail", "XPASS"):
            notes.append(f"  {r['case']}: {r['status']} - known: {r['xfail']}")
        if r["skipped"]:
            notes.append(f"  {r['case']}: skipped - {r['skipped']}")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python scripts/probe_faults.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="Run only this case (repeat or comma-separate)")
    ap.add_argument("--json", action="store_true", help="Print one JSON object on stdout (the table on stderr)")
    ap.add_argument("--jobs", type=int, default=2, help="Cases run at once (default 2)")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary folder (its path is printed)")
    ap.add_argument("--list", action="store_true", help="List the cases and exit")
    a = ap.parse_args(argv)
    if a.list:
        for name, spec in CASES.items():
            mark = f" [xfail: {spec['xfail']}]" if spec["xfail"] else ""
            print(f"{name}: {' '.join(spec['doc'].split())}{mark}")
        return 0
    names = [n for spec in a.only for n in spec.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; the cases: {', '.join(CASES)}")
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    say = sys.stderr if a.json else sys.stdout
    t0 = time.time()
    root = tempfile.mkdtemp(prefix="comal-probe-")
    try:
        inp = Inputs(root)
        setup = time.time() - t0
        print(f"[probe] inputs built in {root} ({setup:.1f} s); {len(names)} case(s), {a.jobs} at a time", file=say)
        order = sorted(names, key=lambda n: not CASES[n]["slow"])  # the two-launch cases first: shortest makespan
        with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(run_case, n, inp, root): n for n in order}
            done = {}
            for fut in concurrent.futures.as_completed(futures):
                r = fut.result()
                done[r["case"]] = r
                print(f"[probe] {r['case']}: {r['status']} ({r['seconds']:.0f} s)", file=say, flush=True)
        results = [done[n] for n in names]
    finally:
        if a.keep:
            print(f"[probe] kept {root}", file=say)
        else:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.time() - t0
    print(table(results), file=say)
    for r in results:
        if r["status"] == "FAIL":
            print(f"\n--- {r['case']}: output tail ---\n{r['output_tail']}", file=say)
    failed = [r["case"] for r in results if not r["ok"]]
    print(f"[probe] {len(results) - len(failed)}/{len(results)} ok in {wall:.0f} s wall", file=say)
    if a.json:
        print(json.dumps({"ok": not failed, "wall_s": round(wall, 1), "setup_s": round(setup, 1), "cases": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
