"""Backend parameters shared by the kernel test modules."""

import pytest
import torch

from comal_openrlhf.kernels import triton_runs_on_cpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not CUDA and not triton_runs_on_cpu(),
        reason="no CUDA and triton was imported before comal_openrlhf.kernels, so its interpreter is off",
    ),
)
BACKENDS = ["torch", TRITON]
