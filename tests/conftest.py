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


# `make test` runs the suite in two workers (pytest-xdist), then these alone: they assert on
# wall-clock ratios or bench output that another worker's load would bend.
SERIAL = ("tests/bench/", "tests/ops/test_contrastive_fused.py::test_speed")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.nodeid.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)
