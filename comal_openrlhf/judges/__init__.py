"""Judges: general preference oracles P(a beats b | prompt), one batched interface (``Judge.prob``).

Kinds (``--judge.kind``):

- ``reward_model``  a Bradley-Terry reward model (OpenRLHF/HF), P = sigmoid((r_a - r_b) / T)       (--judge.path)
- ``pairwise_lm``   a generative LLM judge reading the logits of two label tokens                  (--judge.path)
- ``gpm``           a General Preference representation Model (arXiv 2410.02197): P = sigmoid(v_a^T R_x^T v_b / tau),
                    general (cycles included), one forward per distinct response                 (--judge.path)
- ``mixture``       weighted average of sub-judges, e.g. 1/2 Skywork RM + 1/2 ArmoRM            (--judge.mixture)
- ``remote``        an HTTP judge: our ``serve`` (/prob) or OpenRLHF's serve_rm (/get_reward)       (--judge.url)
- ``python``        a user file defining judge(prompts, responses_a, responses_b)   (--judge.path, opt-in flag)
- ``table``         a preference matrix over canonical responses, or "paper"                       (--judge.table)

``--judge.mixture`` takes either a JSON file holding a list of sub-judge configs, each with a "weight" and any
judge field (unset fields are inherited from the top-level --judge.* flags)::

    [{"kind": "reward_model", "path": "/models/skywork-rm", "weight": 0.5},
     {"kind": "remote", "url": "http://127.0.0.1:5000/get_reward", "weight": 0.5}]

or the inline form ``KIND:TARGET:WEIGHT,KIND:TARGET:WEIGHT`` where TARGET is the kind's path (its URL for remote,
its table for table), e.g. ``reward_model:/models/skywork-rm:0.5,reward_model:/models/armo-rm:0.5``.

In a training script: ``add_judge_args(parser)``, ``args = hierarchize(parser.parse_args())``,
``judge = build_judge(args.judge)``, then ``judge_pairs(judge, ..., both_orders=not args.judge.single_order)``.
"""

import json
import os

from comal_openrlhf.core.judging import (
    Judge,
    JudgeError,
    MixtureJudge,
    TableJudge,
    check_probs,
    is_antisymmetric,
    judge_pairs,
)
from comal_openrlhf.judges.gpm import GPMJudge
from comal_openrlhf.judges.pairwise_lm import PairwiseLMJudge
from comal_openrlhf.judges.python_file import PythonJudge
from comal_openrlhf.judges.remote import MAX_BACKOFF, RemoteJudge
from comal_openrlhf.judges.reward_model import RewardModelJudge

KINDS = ("reward_model", "pairwise_lm", "gpm", "mixture", "remote", "python", "table")

# The one place for judge defaults: the flags and build_judge on a plain dict both read them.
DEFAULTS = {
    "kind": None,
    "path": None,
    "temperature": None,  # None: the kind's own default (KIND_DEFAULTS), else 1.0
    "template": None,
    "labels": "A,B",
    "mixture": None,
    "url": None,
    "token": None,
    "timeout": 60.0,
    "retries": 3,
    "batch_size": None,
    "allow_python_code": False,
    "table": None,
    "single_order": False,
    "device": "auto",
    "gpm_weights": "softmax",  # gpm: the block weights' formula (gpm.WEIGHTS)
}
KIND_DEFAULTS = {"gpm": {"temperature": 0.1}}  # the GPM authors' tau
TEMPERATURE = 1.0  # every other kind
MODEL_BATCH_SIZE = 8  # sequences per forward for model judges
REMOTE_BATCH_SIZE = 64  # comparisons (or texts) per HTTP request


def add_judge_args(parser):
    """Add the ``--judge.*`` flags (OpenRLHF's dotted style; ``hierarchize`` nests them as ``args.judge``).
    Their defaults are ``DEFAULTS`` (the token's is $COMAL_JUDGE_TOKEN)."""
    d = DEFAULTS
    g = parser.add_argument_group("judge")
    g.add_argument("--judge.kind", type=str, choices=KINDS, default=d["kind"], help="Which preference judge to use")
    g.add_argument(
        "--judge.path",
        type=str,
        default=d["path"],
        help="Model path (reward_model, pairwise_lm; gpm: a GPM checkpoint with value_head/prompt_head weights) or "
        ".py file (python)",
    )
    g.add_argument(
        "--judge.temperature",
        type=float,
        default=d["temperature"],
        help="Temperature T: P = sigmoid((r_a - r_b)/T) for reward models, softmax(logits/T) for pairwise_lm, "
        f"sigmoid(v_a^T R_x^T v_b / T) for gpm (default: {KIND_DEFAULTS['gpm']['temperature']} for gpm, the GPM "
        f"authors' tau; {TEMPERATURE} otherwise)",
    )
    g.add_argument(
        "--judge.template",
        type=str,
        default=d["template"],
        help="pairwise_lm prompt template (file or string) with {prompt}, {response_a}, {response_b}",
    )
    g.add_argument(
        "--judge.labels", type=str, default=d["labels"], help="pairwise_lm label tokens for a and b, e.g. A,B"
    )
    g.add_argument(
        "--judge.mixture",
        type=str,
        default=d["mixture"],
        help="mixture: KIND:TARGET:WEIGHT,... or a JSON file with a list of sub-judge configs with weights",
    )
    g.add_argument(
        "--judge.url", type=str, default=d["url"], help="remote: http://HOST:PORT/prob (pairwise) or .../get_reward"
    )
    g.add_argument(
        "--judge.token",
        type=str,
        default=os.environ.get("COMAL_JUDGE_TOKEN", d["token"]),
        help="remote: bearer token (default: $COMAL_JUDGE_TOKEN)",
    )
    g.add_argument(
        "--judge.timeout",
        type=float,
        default=d["timeout"],
        help="remote: total deadline in seconds for one HTTP request (connect, send, wait, read: a server that "
        "trickles bytes is cut off at this deadline)",
    )
    g.add_argument(
        "--judge.retries",
        type=int,
        default=d["retries"],
        help="remote: retries after a failed request, with exponential backoff (1, 2, 4... s, at most "
        f"{MAX_BACKOFF:g} s each); each retry is logged and counted",
    )
    g.add_argument(
        "--judge.batch_size",
        type=int,
        default=d["batch_size"],
        help=f"Sequences per forward (models, default {MODEL_BATCH_SIZE}) or per request (remote, default "
        f"{REMOTE_BATCH_SIZE})",
    )
    g.add_argument(
        "--judge.allow_python_code",
        action="store_true",
        default=d["allow_python_code"],
        help="python: allow running the judge file (it is arbitrary code)",
    )
    g.add_argument("--judge.table", type=str, default=d["table"], help="table: JSON file {P, labels} or 'paper'")
    g.add_argument(
        "--judge.single_order",
        action="store_true",
        default=d["single_order"],
        help="Judge each pair in one order only (default: both orders averaged, cancelling position bias; "
        "antisymmetric judges such as gpm and reward_model are always asked one order)",
    )
    g.add_argument(
        "--judge.device", type=str, default=d["device"], help="Device for model judges: auto, cpu, cuda:0..."
    )
    g.add_argument(
        "--judge.gpm_weights",
        type=str,
        choices=("softmax", "scaled"),
        default=d["gpm_weights"],
        help="gpm: the prompt's block weights, as the checkpoint was trained: 'softmax' = softmax(prompt_head(h)), "
        "the GPM authors' usage example, for their released checkpoints (general-preference/GPM-Llama-3.1-8B, "
        "GPM-Gemma-2B, ...); 'scaled' = k * softmax(prompt_head(h) / sqrt(hidden_size)), for GPMs trained with "
        "the authors' training code since November 2024. Without a prompt head both are all ones "
        f"(default: {d['gpm_weights']})",
    )
    return parser


def _as_dict(cfg):
    cfg = dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))
    unknown = set(cfg) - set(DEFAULTS) - {"weight"}
    if unknown:
        raise JudgeError(f"unknown judge settings: {sorted(unknown)}")
    return {**DEFAULTS, **cfg}


def kind_default(kind, key):
    """The default of setting ``key`` for judges of ``kind`` (KIND_DEFAULTS, then DEFAULTS)."""
    base = TEMPERATURE if key == "temperature" else DEFAULTS[key]
    return KIND_DEFAULTS.get(kind, {}).get(key, base)


def _mixture_items(spec):
    if not spec:
        raise JudgeError("mixture judge needs --judge.mixture")
    if os.path.isfile(spec):
        try:
            with open(spec) as f:
                items = json.load(f)
        except ValueError as e:
            raise JudgeError(f"mixture file {spec!r} is not valid JSON: {e}") from e
        if not isinstance(items, list) or not all(isinstance(x, dict) and "kind" in x for x in items):
            raise JudgeError(f"mixture file {spec!r} must hold a list of objects, each with a 'kind'")
        return items
    items = []
    for part in spec.split(","):
        kind, _, rest = part.strip().partition(":")
        target, _, weight = rest.rpartition(":")
        try:
            weight = float(weight)
        except ValueError:
            raise JudgeError(f"mixture item {part!r} is not KIND:TARGET:WEIGHT") from None
        if not target:
            raise JudgeError(f"mixture item {part!r} is not KIND:TARGET:WEIGHT")
        items.append({"kind": kind, {"remote": "url", "table": "table"}.get(kind, "path"): target, "weight": weight})
    return items


def build_judge(cfg):
    """Build a Judge from ``args.judge`` (the namespace ``hierarchize`` makes) or a plain dict of the same keys."""
    c = _as_dict(cfg)
    kind = c["kind"]
    model_bs = c["batch_size"] or MODEL_BATCH_SIZE
    temperature = c["temperature"] if c["temperature"] is not None else kind_default(kind, "temperature")
    if kind == "table":
        if not c["table"]:
            raise JudgeError("table judge needs --judge.table (a JSON file or 'paper')")
        return TableJudge.load(c["table"])
    if kind == "python":
        return PythonJudge(c["path"], allow_python_code=c["allow_python_code"])
    if kind == "remote":
        return RemoteJudge(
            c["url"],
            token=c["token"],
            timeout=c["timeout"],
            retries=c["retries"],
            batch_size=c["batch_size"] or REMOTE_BATCH_SIZE,
            temperature=temperature,
        )
    if kind == "reward_model":
        return RewardModelJudge(c["path"], temperature=temperature, device=c["device"], batch_size=model_bs)
    if kind == "pairwise_lm":
        labels = c["labels"].split(",") if isinstance(c["labels"], str) else c["labels"]
        return PairwiseLMJudge(
            c["path"],
            template=c["template"],
            labels=tuple(x.strip() for x in labels),
            temperature=temperature,
            device=c["device"],
            batch_size=model_bs,
        )
    if kind == "gpm":
        if not c["path"]:
            raise JudgeError("gpm judge needs --judge.path (a GPM checkpoint directory)")
        return GPMJudge(
            c["path"], temperature=temperature, device=c["device"], batch_size=model_bs, gpm_weights=c["gpm_weights"]
        )
    if kind == "mixture":
        # sub-judges inherit the top-level settings except what names a judge
        inherited = {k: v for k, v in c.items() if k not in ("kind", "path", "url", "table", "mixture", "weight")}
        items = _mixture_items(c["mixture"])
        judges = [build_judge({**inherited, **{k: v for k, v in x.items() if k != "weight"}}) for x in items]
        return MixtureJudge(judges, [x.get("weight", 1.0) for x in items])
    raise JudgeError(f"--judge.kind must be one of {', '.join(KINDS)}, got {kind!r}")


__all__ = [
    "KINDS",
    "Judge",
    "JudgeError",
    "MixtureJudge",
    "add_judge_args",
    "build_judge",
    "check_probs",
    "is_antisymmetric",
    "kind_default",
    "judge_pairs",
]
