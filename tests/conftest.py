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


def pytest_collection_modifyitems(config, items):
    """Order and group for two workers (pytest-xdist, `--dist loadgroup`): each module stays on one worker, so
    its module-scoped runs are made once and shared; the Slurm modules share one worker; and modules that launch
    processes come first, so the long ones do not start last on one worker while the other sits idle."""
    heavy = {item.module.__name__ for item in items
             if item.get_closest_marker("multiproc") or item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in heavy)  # stable: file order kept within each part
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
