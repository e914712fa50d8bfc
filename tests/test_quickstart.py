import json

import pytest

from stepdistill.cli import main
from stepdistill.paths import DIGITS_TEACHER


def test_quickstart_machinery_on_the_embedded_teacher(tmp_path, capsys):
    """A shortened quickstart: trains 3 steps, evaluates 40 samples, and writes the table and results.json."""
    code = main(["quickstart", "--method", "cd", "--output-dir", str(tmp_path), "--num-samples", "40",
                 "train.max_steps=3", "train.progress_bar=false", "train.report_to=none"])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["model"], r["steps"]) for r in rows} == {("teacher", 1), ("teacher", 2), ("teacher", 4), ("teacher", 50),
                                                       ("cd", 1), ("cd", 2), ("cd", 4)}
    assert all(set(r) == {"model", "sampler", "steps", "fid", "params"} and r["fid"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "teacher" in out and "cd" in out and "FID" in out
    assert f"sample grids in {tmp_path / 'cd' / 'samples'}" in out
    card = json.loads((tmp_path / "cd" / "student" / "stepdistill.json").read_text())
    assert card["method"] == "cd" and len(card["metrics"]) == 3
    assert (tmp_path / "cd" / "samples" / "student-2step.png").is_file()
    assert DIGITS_TEACHER.is_dir()


@pytest.mark.slow
def test_quickstart_cd_beats_teacher_ddim_at_two_and_four_steps(quickstart_dir):
    """The embedded default at full length: the consistency student beats the teacher's DDIM at 2 and 4 steps."""
    assert main(["quickstart", "--method", "cd", "--output-dir", str(quickstart_dir), "train.progress_bar=false"]) == 0
    fid = {(r["model"], r["steps"]): r["fid"] for r in json.loads((quickstart_dir / "results.json").read_text())}
    assert fid["cd", 2] < fid["teacher", 2]
    assert fid["cd", 4] < fid["teacher", 4]
