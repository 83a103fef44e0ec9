import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from support import build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a ChatML GPT-2 tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
