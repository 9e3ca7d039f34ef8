"""Triton kernels run in these tests on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels (it decides
once, at import of ``msclip_fast.kernels.*``, which the ops import lazily on first use), so it
is set here, at collection, when no CUDA device exists. It changes nothing for other tests:
``backend="auto"`` never picks Triton for CPU tensors; only tests that name it run it. With a
CUDA device the variable is left alone and the ``gpu``-marked variants run the same tests on
CUDA tensors (bench/gpu_check.sh: ``pytest -m gpu``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
