"""End to end on the digits world (slow): the quickstart's consistency students against the teacher's DDIM."""

import pytest

from stepdistill.paths import DIGITS_TEACHER
from stepdistill.quickstart import quickstart


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lcm", "tcd", "pcm"])
def test_student_beats_teacher_ddim_at_one_and_two_steps(method, quickstart_dir):
    assert DIGITS_TEACHER.is_dir(), "the embedded digits teacher (samples/digits-teacher) is missing"
    rows = quickstart([method], quickstart_dir, num_samples=1000, overrides=["train.progress_bar=false", "train.report_to=none"])
    fid = {(r["model"], r["steps"]): r["fid"] for r in rows if "run" not in r}
    for steps in (1, 2):
        assert fid[(method, steps)] < fid[("teacher", steps)]
    assert fid[(method, 4)] < fid[("teacher", 2)]
    for r in rows:  # pcm's stage students (Hyper-SD: one per stage), each at its own K steps
        if "run" in r:
            assert r["fid"] < fid[("teacher", r["steps"])], r
