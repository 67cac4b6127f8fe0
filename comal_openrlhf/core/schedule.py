"""The COMAL outer loop as data: presets, rounds, reference advances and the beta schedule.

COMAL (the meta-algorithm of arXiv 2410.23223) runs iterations k = 0..N-1. Each iteration solves one prox step of the
KL-regularised game around the prox centre log C = (1 - r) log mu_k + r log ref (r = eta * tau, beta = 1/eta), and
every K iterations the anchor reference advances, ref <- pi (the conceptual prox method the paper builds on). The
paper's v2 recipe changes beta between rounds of iterations (18 iterations in 3 rounds of 6, beta 0.002 in round 1
then 0.1); here a round is ``round_length`` iterations, K by default.

Every baseline of the paper is the same loop with other constants:

    iter-dpo           dpo loss, r = 0: each iteration's reference is the previous iterate mu_k, as in the paper's
                       Iter-DPO/Iter-IPO (the common "online iterative DPO" that keeps the initial policy as the
                       reference would need r = 1 and is not a preset)
    iter-ipo / sppo    r = 0: self-play multiplicative weights on the win rate, no anchor term; cycles
    inpo               r > 0, the anchor never advances (K = 0): the KL-regularised Nash, a constant gap
    comal              r > 0, the anchor advances every K iterations: last-iterate convergence to a Nash policy
    optimistic         rebel loss, r = 0, the online source's win-rate targets replaced by the optimistic payoff
                       2 P(y > mu_k) - P(y > mu_{k-1}) (optimistic MWU; ONPO, arXiv 2502.16852)
    extragradient      ipo loss, two loop iterations per extragradient step: even k = the half step (centre mu_k,
                       pairs from mu_k), odd k = the real step (centre = the anchor, which holds mu_{k-1}, pairs
                       from the half step's policy); the anchor advances every 2 (EGPO, arXiv 2503.08942)

Magnetic mirror descent with a moving magnet (MPO, arXiv 2410.16714) is not a preset: its step at (eta, tau, K) is
COMAL's at beta = 1/eta + tau, r = eta tau / (1 + eta tau), the same K (docs/game-lab.md), so ``comal`` with those
two flags is MMD.

A preset fills each setting the user did not pass (beta, r, K, iterations, pair rule); an explicit flag always wins,
and without ``--comal.algo`` an unchanged ``train_dpo`` launch keeps OpenRLHF's own defaults. ``resolve_plan``
returns the plan and where each value came from. Plain Python, no OpenRLHF import.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

from comal_openrlhf.core.losses import PROX_LOSSES
from comal_openrlhf.errors import PlanError

# beta 0.002, r = 1/3, 24 iterations with the anchor advanced every 12: the official COMAL defaults (Qwen2-1.5B);
# the pair rules are those whose expected loss is the prox step's objective (all_soft with sample-count weights).
PRESETS = {
    "iter-dpo": dict(prox="dpo", ref_weight=0.0, ref_update_interval=0, pair_rule="top2"),
    "iter-ipo": dict(prox="ipo", ref_weight=0.0, ref_update_interval=0, beta=0.002, pair_rule="all_soft"),
    "sppo": dict(prox="sppo", ref_weight=0.0, ref_update_interval=0, pair_rule="all_soft"),
    "inpo": dict(prox="ipo", ref_weight=1.0 / 3.0, ref_update_interval=0, beta=0.002, pair_rule="all_soft"),
    "comal": dict(prox="ipo", ref_weight=1.0 / 3.0, ref_update_interval=12, beta=0.002, pair_rule="all_soft"),
    # the last-iterate learners of other papers at tau = 0 (the game itself), beta from the flag or OpenRLHF
    "optimistic": dict(prox="rebel", ref_weight=0.0, ref_update_interval=0, pair_rule="all_soft"),
    "extragradient": dict(prox="ipo", ref_weight=0.0, ref_update_interval=2, pair_rule="all_soft"),
}
OPTIMISTIC_PROXES = ("rebel", "sppo")  # the losses whose targets are win rates: the optimistic payoff is one
DEFAULT_ITERATIONS = 24
PROXES = PROX_LOSSES

ALGO_HELP = (
    "Preset filling every setting not passed explicitly: iter-dpo = (dpo loss, r 0, pairs top2 as the official "
    "baselines; the reference "
    "of iteration k is the previous iterate, as the paper's Iter-DPO, not the start policy as in common online "
    "iterative DPO), iter-ipo = (ipo, r 0, beta 0.002, all_soft), sppo = (sppo, r 0, "
    "all_soft), inpo = (ipo, r 1/3, anchor never advanced, beta 0.002, all_soft), comal = (ipo, r 1/3, anchor "
    "advanced every 12, beta 0.002, all_soft), optimistic = (rebel, r 0, all_soft, online source only; the win-rate "
    "targets are the optimistic payoff 2 P(y > mu_k) - P(y > mu_{k-1}), each sample also judged against the previous "
    "iteration's samples), extragradient = (ipo, r 0, all_soft; two iterations per extragradient step, the odd one "
    "centred on the anchor, advanced every 2); MMD (MPO) is comal at beta 1/eta + tau, r eta tau/(1 + eta tau); "
    "24 iterations unless the source fixes the count. Without this flag an "
    "unchanged train_dpo launch keeps its meaning and OpenRLHF's defaults: iter-ipo with --model.ipo_enable, else "
    "iter-dpo."
)


@dataclass
class Plan:
    algo: str
    prox: str
    ref_weight: float
    ref_update_interval: int  # K; 0 = the anchor never advances
    round_length: int  # iterations per beta round
    iterations: int
    betas: tuple  # beta per round; the last one is kept for later rounds
    pair_rule: Optional[str] = None  # online sources only

    def ref_weight_at(self, k: int) -> float:
        """r of iteration k. Extragradient's odd iterations (the real step) are centred on the anchor, r = 1: the
        anchor holds mu_{k-1}, the policy the half step started from (it advances after every odd iteration)."""
        if self.algo == "extragradient" and k % 2 == 1:
            return 1.0
        return self.ref_weight

    def round_of(self, k: int) -> int:
        return k // self.round_length

    def beta_at(self, k: int) -> float:
        return self.betas[min(self.round_of(k), len(self.betas) - 1)]

    def advance_after(self, k: int) -> bool:
        """True when the anchor takes the policy's weights at the end of iteration k."""
        K = self.ref_update_interval
        return K > 0 and (k + 1) % K == 0

    def round_ends_after(self, k: int) -> bool:
        return (k + 1) % self.round_length == 0 or k + 1 == self.iterations

    def as_dict(self):
        return asdict(self)


def parse_beta_schedule(text: Optional[str]) -> tuple:
    if not text:
        return ()
    try:
        betas = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise PlanError(f"--comal.beta_schedule must be comma-separated numbers, got {text!r}") from None
    if not betas or any(not (math.isfinite(b) and b > 0) for b in betas):
        raise PlanError(f"--comal.beta_schedule needs finite positive betas, got {text!r}")
    return betas


def resolve_plan(
    algo=None,
    prox=None,
    ref_weight=None,
    ref_update_interval=None,
    iterations=None,
    beta=None,
    beta_schedule=None,
    ipo_enable=False,
    default_iterations=None,
    round_length=None,
    pair_rule=None,
    openrlhf_beta=0.1,
):
    """Preset + explicit settings -> (Plan, provenance).

    Every argument left at None was not passed by the user: the preset (when ``--comal.algo`` was given) fills it,
    else OpenRLHF's default (``openrlhf_beta``) or the plugin's. ``default_iterations`` is the count a source fixes
    (the number of offline files, 1 for a static dataset). ``provenance`` maps each setting to "flag", "preset",
    "source", "OpenRLHF default" or "default".
    """
    source = {}

    def pick(name, given, preset_value, fallback, fallback_source="default"):
        if given is not None:
            source[name] = "flag"
            return given
        if preset_value is not None:
            source[name] = "preset"
            return preset_value
        source[name] = fallback_source
        return fallback

    explicit_algo = algo is not None
    if algo is None:
        algo = "iter-ipo" if ipo_enable else "iter-dpo"
    if algo not in PRESETS:
        raise PlanError(f"--comal.algo must be one of {', '.join(PRESETS)}, got {algo!r}")
    preset = PRESETS[algo] if explicit_algo else {"prox": PRESETS[algo]["prox"], "ref_weight": 0.0}
    source["algo"] = "flag" if explicit_algo else "default"

    prox = pick("prox", prox, preset.get("prox"), None)
    if prox not in PROXES:
        raise PlanError(f"--comal.prox must be one of {', '.join(PROXES)}, got {prox!r}")
    if ipo_enable and prox != "ipo":
        raise PlanError(
            f"--model.ipo_enable selects the IPO loss but the run uses the {prox} loss "
            f"({'--comal.prox' if source['prox'] == 'flag' else '--comal.algo ' + algo}); drop --model.ipo_enable "
            "or pass --comal.prox ipo"
        )
    r = float(pick("ref_weight", ref_weight, preset.get("ref_weight"), 0.0))
    if not (math.isfinite(r) and 0.0 <= r < 1.0):
        raise PlanError(f"--comal.ref_weight (r = eta * tau) must lie in [0, 1), got {r}")
    K = int(pick("ref_update_interval", ref_update_interval, preset.get("ref_update_interval"), 0))
    if K < 0:
        raise PlanError(f"--comal.ref_update_interval must be >= 0 (0 = never advance), got {K}")

    if iterations is not None:
        n, source["iterations"] = iterations, "flag"
    elif default_iterations is not None:
        n, source["iterations"] = default_iterations, "source"
    else:
        n, source["iterations"] = DEFAULT_ITERATIONS, "default"
    if n <= 0:
        raise PlanError(f"--comal.iterations must be positive, got {n}")

    b = pick("beta", beta, preset.get("beta"), openrlhf_beta, "OpenRLHF default")
    if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
        raise PlanError(f"--model.beta must be a finite number > 0, got {b}")
    betas = parse_beta_schedule(beta_schedule)
    if betas:
        source["beta"] = "flag (--comal.beta_schedule)"
        if beta is not None and float(beta) != betas[0]:
            raise PlanError(
                f"--model.beta {beta} and --comal.beta_schedule {beta_schedule} disagree on round 1's beta; "
                "pass one of them"
            )
    else:
        betas = (float(b),)

    L = pick("round_length", round_length, None, K if K > 0 else n, "default (K)" if K > 0 else "default (all)")
    if L is None or L <= 0:
        raise PlanError(f"--comal.round_length must be positive, got {L}")
    rounds = math.ceil(n / L)
    if len(betas) > rounds:
        hint = (
            " (the anchor never advances with this preset, so rounds need --comal.round_length)"
            if K == 0 and round_length is None
            else ""
        )
        raise PlanError(
            f"--comal.beta_schedule has {len(betas)} betas but {n} iterations in rounds of {L} make {rounds} "
            f"round(s): betas {list(betas[rounds:])} would never apply{hint}"
        )

    rule = pick("pair_rule", pair_rule, preset.get("pair_rule"), "all_soft")
    if algo == "optimistic" and prox not in OPTIMISTIC_PROXES:
        raise PlanError(
            f"--comal.algo optimistic regresses on the optimistic payoff 2 P(y > mu_k) - P(y > mu_(k-1)), which lies "
            f"in [-1, 2]: a win-rate target ({', '.join(OPTIMISTIC_PROXES)}), not a pair label, so the {prox} loss "
            "cannot take it"
        )
    if algo == "extragradient":
        if r != 0.0 or K != 2:
            raise PlanError(
                "--comal.algo extragradient runs the half step and the real step as two iterations: the real step is "
                "centred on the anchor, which must hold the half step's starting policy, so r = 0 and the anchor "
                f"advanced every 2 iterations are fixed (got --comal.ref_weight {r}, --comal.ref_update_interval "
                f"{K}); "
                "tau > 0 would need a third model (mu_k, the half step and a fixed anchor)"
            )
        if n % 2 or int(L) % 2:
            raise PlanError(
                f"--comal.algo extragradient takes two iterations per step: --comal.iterations ({n}) and "
                f"--comal.round_length ({L}) must be even, so both prox problems of a step share beta"
            )
    return Plan(algo, prox, r, K, int(L), int(n), betas, rule), source


def plan_differences(old: dict, new: dict) -> list:
    """[(setting, checkpoint value, this run's value)] for every plan setting that differs."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            out.append((name, a, b))
    return out
