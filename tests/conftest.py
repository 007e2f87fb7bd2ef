"""Test-wide options: golden regeneration and hypothesis profiles.

`pytest --update-goldens` (or SURGEON_UPDATE_GOLDENS=1) rewrites golden files instead of comparing;
review the diff before committing. Hypothesis runs derandomized with few examples when CI is set or
HYPOTHESIS_PROFILE=ci, so CI is reproducible.
"""

from __future__ import annotations

import os

# Triton's interpreter must be on before anything imports triton (peft, bitsandbytes and
# transformers do): without a GPU, tests/kernels/ run the Triton kernels on CPU tensors with it.
# The runtime never routes CPU tensors to a kernel unless a test asks (surgeon.kernels).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden files from the current output")


@pytest.fixture
def update_goldens(request) -> bool:
    return bool(request.config.getoption("--update-goldens")) or os.environ.get("SURGEON_UPDATE_GOLDENS") == "1"
