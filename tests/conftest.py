"""Set ``TRITON_INTERPRET=1`` (no CUDA device) before any test module is imported.

Triton decides at decoration time whether a ``@triton.jit`` function is interpreted, and that
includes Triton's own ``triton.language`` helpers (``tl.zeros``...), decorated when ``triton``
is first imported. Test modules can import Triton indirectly at collection (for example
``torch.utils.flop_counter`` imports it through torch's higher-order ops), so the variable must
be set here, in the root conftest, which pytest loads before collecting any test module;
tests/ops/conftest.py explains why the Triton tests need it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
