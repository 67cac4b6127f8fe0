"""comal-openrlhf: COMAL (Liu et al., arXiv 2410.23223) as an OpenRLHF plugin.

Imported first in every process of the environment (``comal_openrlhf.pth`` loads the ``openrlhf.cli.train_comal``
alias at start-up), so the two start-up notices a CPU machine would print on every command are settled here, before
torch or DeepSpeed load:

- torch's ``import pynvml`` FutureWarning ("The pynvml package is deprecated"): the deprecated name comes with
  OpenRLHF's dependencies, nothing this package can act on; ignored by its exact message only.
- bitsandbytes (an OpenRLHF dependency) on a CPU with AVX-512 BF16 tries ``from kernels import get_kernel`` for a
  4-bit GEMM this project never uses and logs "Failed to load CPU gemm_4bit_forward ..." when the Hugging Face
  ``kernels`` package is absent (or, from this repository's root, finds this project's ``kernels/`` instead): the
  record is dropped by a filter on that logger and that message only.
- DeepSpeed's accelerator probe writes "Setting accelerator to CPU ..." to stdout (where ``--json`` output goes)
  when it finds no GPU. With no NVIDIA device node present, ``DS_ACCELERATOR`` defaults to ``cpu``, the value the
  probe would pick; a value the user set is kept.
"""

import glob as _glob
import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

_warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)
if "DS_ACCELERATOR" not in _os.environ and not _glob.glob("/dev/nvidia[0-9]*"):
    _os.environ["DS_ACCELERATOR"] = "cpu"
