"""Where an op runs: Triton on CUDA tensors, the plain-PyTorch reference elsewhere.

Under the Triton interpreter (``TRITON_INTERPRET=1``) CPU tensors take the Triton path too, so
the CPU test suite runs the real kernels on small shapes.
"""

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives where the Triton kernels can run."""
    for t in tensors:  # a plain loop: no generator per call, and CUDA tensors never read the environment
        if not t.is_cuda and not (t.device.type == "cpu" and interpreting()):
            return False
    return True
