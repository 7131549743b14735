import importlib.util
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
# user's cache); tests that calibrate use the `calibrating` fixture (a cache of their own).
os.environ.setdefault("MODLORA_CALIBRATE", "0")

# `python -m pytest` puts the working directory first on sys.path. From the repository root, its
# kernels/ folder (installed as modlora.kernels) would then shadow Hugging Face's `kernels` package,
# which transformers >= 5.25 imports; the suite imports modlora from its installation instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry).resolve() != _ROOT]
_modlora = importlib.util.find_spec("modlora")
if _modlora is None or not Path(_modlora.origin).resolve().is_relative_to(_ROOT / "modlora"):
    raise pytest.UsageError(f"the tests run against this working tree ({_ROOT}), installed with `pip install -e .`; "
                            f"modlora imports from {_modlora and _modlora.origin}")

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


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """modlora.dispatch calibrating into a cache dir of the test's own, nothing forced; the suite's
    state after."""
    from modlora import dispatch

    monkeypatch.setenv("MODLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MODLORA_CALIBRATE", "1")
    monkeypatch.delenv("MODLORA_DISPATCH", raising=False)
    dispatch.reset()
    yield
    monkeypatch.undo()
    dispatch.reset()
