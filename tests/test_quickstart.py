import json

import pytest

from stepdistill.cli import main
from stepdistill.paths import DIGITS_TEACHER
from stepdistill.quickstart import quickstart


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


@pytest.fixture
def flow_teacher_16(tmp_path_factory, monkeypatch):
    """`--teacher flow` pointed at a tiny 16x16 flow-matching teacher (the digits size the FID classifier reads)."""
    import stepdistill.quickstart as qs
    from tiny_models import save_class_flow_teacher

    path = save_class_flow_teacher(tmp_path_factory.mktemp("teachers") / "flow16", size=16)
    monkeypatch.setitem(qs.TEACHERS, "flow", path)
    return path


def test_quickstart_on_the_flow_teacher_has_euler_baselines(flow_teacher_16, tmp_path, capsys):
    """`--teacher flow`: the flow teacher's Euler at 1/2/4/50 steps, and cd trained on it (2 steps)."""
    code = main(["quickstart", "--teacher", "flow", "--method", "cd", "--output-dir", str(tmp_path),
                 "--num-samples", "20", "train.max_steps=2", "train.progress_bar=false", "train.report_to=none"])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["model"], r["sampler"], r["steps"]) for r in rows} == {
        ("teacher", "euler", 1), ("teacher", "euler", 2), ("teacher", "euler", 4), ("teacher", "euler", 50),
        ("cd", "consistency", 1), ("cd", "consistency", 2), ("cd", "consistency", 4)}
    assert all(r["fid"] > 0 for r in rows)
    card = json.loads((tmp_path / "cd" / "student" / "stepdistill.json").read_text())
    assert card["teacher"] == str(flow_teacher_16)
    assert "sample grids in" in capsys.readouterr().out


def test_quickstart_without_the_flow_teacher_says_how_to_train_it(tmp_path, monkeypatch):
    import stepdistill.quickstart as qs
    from stepdistill.errors import ConfigError

    monkeypatch.setitem(qs.TEACHERS, "flow", tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"train_teacher.py --kind flow"):
        quickstart(["cd"], tmp_path / "out", teacher="flow")


def test_quickstart_on_the_flow_teacher_skips_methods_without_flow_support_with_the_reason(flow_teacher_16, tmp_path,
                                                                                          capsys):
    rows = quickstart(["guidance"], tmp_path, num_samples=20, teacher="flow")
    out = capsys.readouterr().out
    assert "guidance: skipped on the flow teacher: not yet run on a flow teacher" in out
    assert {r["model"] for r in rows} == {"teacher"} and not (tmp_path / "guidance").exists()


@pytest.mark.slow
def test_quickstart_cd_beats_teacher_ddim_at_two_and_four_steps(quickstart_dir):
    """The embedded default at full length: the consistency student beats the teacher's DDIM at 2 and 4 steps."""
    assert main(["quickstart", "--method", "cd", "--output-dir", str(quickstart_dir), "train.progress_bar=false"]) == 0
    fid = {(r["model"], r["steps"]): r["fid"] for r in json.loads((quickstart_dir / "results.json").read_text())}
    assert fid["cd", 2] < fid["teacher", 2]
    assert fid["cd", 4] < fid["teacher", 4]
