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


# `make test` runs the suite in two workers (pytest-xdist, --dist loadgroup), then these alone:
# they assert on wall-clock ratios or bench output that another worker's load would bend.
SERIAL = ("tests/bench/", "tests/ops/test_contrastive_fused.py::test_speed")
# Each test file stays on one worker (its module fixtures are built once), except these long
# files of independent, fixture-free cases, whose tests spread over both workers.
SPREAD = ("tests/models/test_trim_text.py", "tests/models/test_grad_checkpointing.py")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        path = item.nodeid.split("::")[0]
        if item.nodeid.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)
        elif path not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(path))
