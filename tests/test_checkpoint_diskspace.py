"""Free space is checked before a checkpoint or export is written (launcher/diskspace.py), on real paths."""
import shutil

import pytest

from launcher.checkpoint.diskspace import check_free_space, checkpoint_estimate, human
from launcher.errors import UserError


def test_a_write_that_fits_passes(tmp_path):
    check_free_space(tmp_path / "run", 1024, "checkpoint of step 2")


def test_a_write_larger_than_the_free_space_is_refused_saying_how_much_and_where(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError) as refused:
        check_free_space(tmp_path / "run" / "not-yet", free * 2, "checkpoint of step 4")
    message = str(refused.value)
    assert "checkpoint of step 4" in message and str(tmp_path) in message and human(free * 2 * 1.1) in message
    assert "last good checkpoint is kept" in message
    assert not (tmp_path / "run").exists(), "nothing may be written"


def test_the_estimate_is_the_previous_checkpoint_when_there_is_one(tmp_path):
    previous = tmp_path / "step-2"
    (previous / "dcp").mkdir(parents=True)
    (previous / "dcp" / "__0_0.distcp").write_bytes(b"x" * 3000)
    (previous / "trainer_state.json").write_text("{}")
    assert checkpoint_estimate(previous, held_bytes=10) == 3002
    assert checkpoint_estimate(None, held_bytes=10) == 10
