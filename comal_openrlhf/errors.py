"""Typed errors of the plugin. Library code raises these; only the command lines (``train_comal``, ``demo``,
``evaluate``, ``generate``, ``judge``, the game lab) turn them into one message and a non-zero exit.

    COMALError
    ├── BadInputError      a data file, row or setting that cannot be used (names the file, line or flag)
    │   └── DataError      a malformed data file (kept as the historical name for file/line errors)
    ├── PlanError          a run plan that cannot work, or a resume that does not match its checkpoint
    ├── JudgeError         a judge that cannot produce valid probabilities
    ├── RolloutError       a rollout engine (vLLM) that died, timed out or did not receive the policy's weights
    ├── NonFiniteLossError training produced a NaN/inf loss
    ├── RunLockError       another run holds the checkpoint directory
    ├── PeerLostError      a rank or node of a distributed run died or stopped answering (names it)
    ├── StorageError       a result could not be written (full disk, read-only folder): names the path and free space
    └── ImpossibleResultError  a computed figure that cannot be (a probability above 1): names what produced it
"""


class COMALError(RuntimeError):
    """Base of every error the plugin raises on purpose; the message is meant for the user as is."""


class BadInputError(COMALError, ValueError):
    """Input that cannot be used: the message names the file and line, the row, or the flag."""


class DataError(BadInputError):
    """A malformed input file: the message names the file and the line."""


class PlanError(COMALError, ValueError):
    """Settings that cannot work together, or a resume whose checkpoint was written with other settings."""


class JudgeError(COMALError):
    """A judge could not produce valid probabilities (bad output, unreachable server, refused code...)."""


class RolloutError(COMALError):
    """A rollout engine failed: a vLLM engine died, did not answer in time, or did not receive the weights pushed."""


class NonFiniteLossError(COMALError):
    """A NaN or inf loss: training stops, the last good checkpoint is kept."""


class RunLockError(COMALError):
    """Another live process holds the run directory (or a stale lock was found)."""


class PeerLostError(COMALError):
    """A peer of a distributed run was lost: a collective failed on a closed connection or waited past
    ``--comal.dist_timeout``. The message names the lost rank(s) and node; the run resumes with ``--ckpt.load_enable``.
    """


class StorageError(COMALError):
    """A result could not be written completely (full disk, read-only folder...): the message names the path and the
    free space; what was written before stays loadable."""


class ImpossibleResultError(COMALError):
    """A computed figure that cannot be true (a probability above 1, a duality gap above 1): the message names what
    produced it and the likely fix. Raised instead of reporting the figure."""
