"""The COMAL outer loop as data: presets, rounds, reference advances and the beta schedule.

COMAL (arXiv 2410.23223; shared/spec/COMAL.md sections 2 and 5) runs iterations k = 0..N-1. Each iteration solves
one prox step of the KL-regularised game around the prox centre log C = (1 - r) log mu_k + r log ref, and every K
iterations the anchor reference advances, ref <- pi (the conceptual prox method). Iterations between two advances
form a round; the paper's v2 recipe changes beta per round (0.002 in round 1, then 0.1).

Every baseline of the paper is the same loop with other constants (section 2):

    iter-dpo / iter-ipo / sppo : r = 0 (self-play MWU, no anchor term; K irrelevant)
    inpo                       : r > 0, anchor never advances (K = 0) -> regularised Nash, constant gap
    comal                      : r > 0, anchor advances every K iterations -> last-iterate Nash

Plain Python, no OpenRLHF import.
"""

from dataclasses import asdict, dataclass
from typing import Optional

# Official COMAL defaults (COMAL.md section 5): beta 0.002 comes from --model.beta, r = 1/3, K = 12 of 24.
PRESETS = {
    "iter-dpo": dict(prox="dpo", ref_weight=0.0, ref_update_interval=0),
    "iter-ipo": dict(prox="ipo", ref_weight=0.0, ref_update_interval=0),
    "sppo": dict(prox="sppo", ref_weight=0.0, ref_update_interval=0),
    "inpo": dict(prox="ipo", ref_weight=1.0 / 3.0, ref_update_interval=0),
    "comal": dict(prox="ipo", ref_weight=1.0 / 3.0, ref_update_interval=12),
}
PROXES = ("ipo", "dpo", "sppo", "rebel")


@dataclass
class Plan:
    algo: str
    prox: str
    ref_weight: float
    ref_update_interval: int  # K; 0 = the anchor never advances
    iterations: int
    betas: tuple  # beta per round; the last one is kept for later rounds

    def round_of(self, k: int) -> int:
        """Number of reference advances that happened before iteration k."""
        return k // self.ref_update_interval if self.ref_update_interval > 0 else 0

    def beta_at(self, k: int) -> float:
        return self.betas[min(self.round_of(k), len(self.betas) - 1)]

    def advance_after(self, k: int) -> bool:
        """True when the anchor takes the policy's weights at the end of iteration k."""
        K = self.ref_update_interval
        return K > 0 and (k + 1) % K == 0

    def as_dict(self):
        return asdict(self)


def parse_beta_schedule(text: Optional[str]) -> tuple:
    if not text:
        return ()
    try:
        betas = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--comal.beta_schedule must be comma-separated numbers, got {text!r}") from None
    if not betas or any(not b > 0 for b in betas):
        raise ValueError(f"--comal.beta_schedule needs positive betas, got {text!r}")
    return betas


def resolve_plan(
    algo=None,
    prox=None,
    ref_weight=None,
    ref_update_interval=None,
    iterations=None,
    beta=0.1,
    beta_schedule=None,
    ipo_enable=False,
    default_iterations=None,
) -> Plan:
    """Preset + explicit overrides -> Plan.

    Without ``--comal.algo`` an existing OpenRLHF DPO/IPO launch keeps its meaning: iterative DPO, or iterative IPO
    with ``--model.ipo_enable``. Explicit ``--comal.*`` flags override the preset's values.
    """
    if algo is None:
        algo = "iter-ipo" if ipo_enable else "iter-dpo"
    if algo not in PRESETS:
        raise ValueError(f"--comal.algo must be one of {', '.join(PRESETS)}, got {algo!r}")
    preset = PRESETS[algo]
    if prox is None:
        prox = preset["prox"]
        if ipo_enable and prox != "ipo":
            raise ValueError(
                f"--model.ipo_enable selects the IPO loss but --comal.algo {algo} uses {prox}; "
                "pass --comal.prox explicitly to choose one"
            )
    if prox not in PROXES:
        raise ValueError(f"--comal.prox must be one of {', '.join(PROXES)}, got {prox!r}")
    r = preset["ref_weight"] if ref_weight is None else float(ref_weight)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"--comal.ref_weight (r = eta * tau) must lie in [0, 1), got {r}")
    K = preset["ref_update_interval"] if ref_update_interval is None else int(ref_update_interval)
    if K < 0:
        raise ValueError(f"--comal.ref_update_interval must be >= 0 (0 = never advance), got {K}")
    n = iterations if iterations is not None else default_iterations
    if n is None:
        n = 24
    if n <= 0:
        raise ValueError(f"--comal.iterations must be positive, got {n}")
    if not beta > 0:
        raise ValueError(f"--model.beta must be positive, got {beta}")
    betas = parse_beta_schedule(beta_schedule) or (float(beta),)
    return Plan(algo, prox, r, K, int(n), betas)
