import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in its interpreter. Triton reads this when first imported (its
# own tl.* helpers included), and transformers/peft import it, so it is set here, before any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs with the dispatcher's defaults (no timing-dependent choices, nothing written to the
# user's cache); tests/test_dispatch.py turns calibration on with a cache of its own.
os.environ.setdefault("MODLORA_CALIBRATE", "0")

# Test helpers (tests/hf_reference.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny shapes: they gain nothing from intra-op threads, and on a busy 2-core box
    threads cost several x. Used with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
