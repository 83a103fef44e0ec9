import os
import sys
from pathlib import Path

import pytest

# every launched process inherits these: one OpenMP thread (2 cores are shared by the tests' processes) and no hub
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from support import build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the small ChatML tokenizer, built once per session."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))

