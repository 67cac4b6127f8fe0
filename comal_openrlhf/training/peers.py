"""The ranks of a distributed run (which node, host and process each is) and what a survivor says when one is lost.

Distribution is torch.distributed as OpenRLHF's strategy sets it up (``deepspeed.init_distributed``); this module
adds no transport. It bounds how long a collective waits for a peer (the process-group timeout,
``--comal.dist_timeout``, 180 s by default where OpenRLHF uses 60 minutes) and gives the phases that are serial on
rank 0 (sampling with vLLM and judging, which the other ranks wait for) a group of their own with a longer bound
(``--comal.serial_timeout``). A peer that dies closes its sockets, and gloo (CPU) and NCCL report that at once; the
timeout is the bound for a peer that hangs or a host whose network is gone.

On a failed collective every surviving rank raises one :class:`PeerLostError` naming the lost rank(s) and node: the
table of ranks gathered at start-up says which node and process each rank is; a peer on this host is checked by its
process id, a peer on another host is named by elimination (the ranks of the other nodes)."""

import os
import re
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from comal_openrlhf.errors import PeerLostError
from comal_openrlhf.rundir import pid_alive

DEFAULT_DIST_TIMEOUT_S = 180
DEFAULT_SERIAL_TIMEOUT_S = 3600

_SERIAL_GROUP = None

# the messages of a collective that lost its peer: gloo's closed or reset connection and its timeout, NCCL's
# watchdog and remote errors, the TCP store's (torch.distributed raises RuntimeError or DistError subclasses)
_PEER_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|closed by peer|broken pipe|timed out|timeout|watchdog|"
    r"socket|DistNetworkError|DistBackendError|DistStoreError",
    re.IGNORECASE,
)


def node_rank() -> int:
    """This process's node: torchrun's GROUP_RANK (its --node_rank), else NODE_RANK (DeepSpeed's launcher), else 0."""
    for key in ("GROUP_RANK", "NODE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a killed process nobody reaped yet is dead
    except (OSError, IndexError):
        return pid_alive(pid)


class Peers:
    """Every rank's node, host and pid, the same table on every rank."""

    def __init__(self, table, rank, dist_timeout_s=DEFAULT_DIST_TIMEOUT_S):
        self.table = table
        self.rank = rank
        self.dist_timeout_s = dist_timeout_s

    @classmethod
    def gather(cls, dist_timeout_s=DEFAULT_DIST_TIMEOUT_S, serial_timeout_s=DEFAULT_SERIAL_TIMEOUT_S):
        """Collective: every rank's entry; also creates the group the rank-0 serial phases wait on."""
        global _SERIAL_GROUP
        me = {"rank": 0, "node": node_rank(), "host": socket.gethostname(), "pid": os.getpid()}
        if not (dist.is_available() and dist.is_initialized()):
            return cls([me], 0, dist_timeout_s)
        me["rank"] = dist.get_rank()
        table = [None] * dist.get_world_size()
        dist.all_gather_object(table, me)
        if dist.get_world_size() > 1:
            _SERIAL_GROUP = dist.new_group(timeout=timedelta(seconds=serial_timeout_s))
        return cls(table, me["rank"], dist_timeout_s)

    @property
    def me(self):
        return self.table[self.rank]

    def nodes(self):
        out = {}
        for e in self.table:
            out.setdefault(e["node"], []).append(e)
        return out

    def describe(self) -> str:
        nodes = self.nodes()
        parts = "; ".join(
            f"node {n} ({es[0]['host']}): ranks {[e['rank'] for e in es]}" for n, es in sorted(nodes.items())
        )
        return (
            f"[comal] distributed: world size {len(self.table)} on {len(nodes)} node(s) ({parts}); a collective "
            f"waits at most {self.dist_timeout_s:g} s for a peer (--comal.dist_timeout)"
        )

    def lost(self, wait_s=5.0):
        """The ranks taken for lost: the dead processes on this host, else every rank of the other nodes. A killed
        peer closes its sockets before its process is gone, so this host's peers are watched for ``wait_s``."""
        here = [e for e in self.table if e["host"] == self.me["host"] and e["rank"] != self.rank]
        deadline = time.time() + (wait_s if here else 0)
        while True:
            dead = [e for e in here if not _alive(e["pid"])]
            if dead:
                return dead, True
            if time.time() >= deadline:
                return [e for e in self.table if e["node"] != self.me["node"]], False
            time.sleep(0.1)

    def error(self, exc: BaseException) -> PeerLostError:
        lost, certain = self.lost()
        cause = " ".join(str(exc).split())
        cause = re.sub(r"^\[[^\]]*\] ", "", cause)  # gloo prefixes its source file and adds advice
        cause = cause.split(" This is typically")[0][:200].rstrip(".")
        nodes = {}
        for e in lost:
            nodes.setdefault(e["node"], []).append(e)
        named = ", ".join(
            f"node {n} ({es[0]['host']}, rank{'s' if len(es) > 1 else ''} {', '.join(str(e['rank']) for e in es)})"
            for n, es in sorted(nodes.items())
        )
        what = f"lost {named}" if certain else f"lost contact with {named or 'a peer'}"
        return PeerLostError(
            f"{what}: a collective failed on rank {self.rank} (node {self.me['node']}) with: {cause}. The run stops "
            f"here; relaunch every node with --ckpt.load_enable to resume from the last checkpoint"
        )


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer is gone (not a bug of this rank's own)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_FAILURE.search(str(exc)))


def serial_group():
    """The process group to wait on rank 0's serial phases with (None: the default group)."""
    return _SERIAL_GROUP
