"""Fused per-sequence log-probability kernels (installed as ``comal_openrlhf.kernels``).

    sequence_logps(logits, labels, mask)              -> (seq_sum, seq_mean)
    sequence_logratio(policy_logits, ref_logits, ...) -> (policy_sum, ref_sum, policy_sum - ref_sum)
    linear_sequence_logps(hidden, weight, ...)        -> (seq_sum, seq_mean), never materialising N x V logits

Each takes ``backend`` in BACKENDS: "triton" (CUDA), "torch" (chunked PyTorch, any device) or "auto" (triton on
CUDA tensors, torch otherwise). Plain PyTorch references live in ``reference.py``; ``config.py`` holds every launch
configuration and the cost model. These kernels know nothing of OpenRLHF or COMAL: they import torch, triton and
each other (relative imports), so the folder also imports by path where the project is not installed. Benchmarks and
the ahead-of-time compile check live outside the package, in the repository's ``benchmarks/`` (``kernels_bench.py``,
``kernels_aot.py``, ``device_check.py``).

Triton on a CPU-only machine: Triton runs kernels on CPU tensors only in its interpreter, which triton 3.8 picks
when a ``@triton.jit`` decorator runs (``triton.jit`` reads ``knobs.runtime.interpret``, i.e. the TRITON_INTERPRET
environment variable, at decoration time). Triton's own library functions (``tl.sum``, ``tl.cdiv``, ...) are
decorated when triton is first imported, and an interpreted kernel cannot call compiled ones, so the variable must
be set before the first ``import triton`` in the process. Hence: when CUDA is absent and TRITON_INTERPRET is unset,
importing this package sets TRITON_INTERPRET=1 for the rest of the process (Triton kernels of other libraries
imported later are then interpreted too; without a GPU they could not run compiled anyway). If triton was already
imported without it (e.g. ``import openrlhf`` pulls in deepspeed, which imports triton), backend="triton" on CPU
raises a clear error and ``triton_runs_on_cpu()`` is False; "auto" and "torch" are unaffected.
"""

import os

if __name__ == "kernels":
    # Imported as a top-level ``kernels`` because a checkout's root is on sys.path (``python -m ...`` run from it):
    # transformers probes the PyPI package of that name. Stay an empty module without a version, which its probe
    # reads as "no usable kernels package", instead of importing torch/triton under the wrong name.
    __version__ = "N/A"
else:
    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"

    from .linear_sequence_logps import linear_sequence_logps
    from .sequence_logps import BACKENDS, resolve_backend, sequence_logps, triton_runs_on_cpu
    from .sequence_logratio import sequence_logratio

    __all__ = [
        "BACKENDS",
        "linear_sequence_logps",
        "resolve_backend",
        "sequence_logps",
        "sequence_logratio",
        "triton_runs_on_cpu",
    ]
