import subprocess
import sys

from PIL import Image

from stepdistill.cli import main
from stepdistill.paths import CONFIGS

FAST = ["train.progress_bar=false", "train.report_to=none", "train.batch_size=4", "train.num_sample_images=4"]


def test_bad_config_key_is_a_one_line_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stepdistill.cli", "train", str(CONFIGS / "digits/consistency.yaml"),
                           "train.learning_rat=1e-4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown config key 'train.learning_rat'; did you mean 'learning_rate'")
    assert "Traceback" not in proc.stderr


def test_missing_teacher_is_named(tmp_path, capsys):
    code = main(["train", str(CONFIGS / "digits/consistency.yaml"), f"teacher={tmp_path}/nope", f"output_dir={tmp_path}"])
    assert code == 2
    assert f"teacher '{tmp_path}/nope' not found" in capsys.readouterr().err


def test_train_export_and_sample_commands(class_teacher, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", str(CONFIGS / "digits/consistency.yaml"), f"teacher={class_teacher}", f"output_dir={run_dir}",
                 "train.max_steps=2", *FAST]) == 0
    assert main(["export", str(run_dir), "--steps", "2", "--weights", "student", "--out", str(tmp_path / "exported")]) == 0
    assert main(["sample", str(tmp_path / "exported"), "--steps", "2", "--num", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size[0] > 16
    assert main(["sample", str(class_teacher), "--steps", "3", "--num", "4", "--guidance", "2.0",
                 "--out", str(tmp_path / "t.png")]) == 0


def test_sample_with_zero_steps_is_refused(class_teacher, tmp_path, capsys):
    assert main(["sample", str(class_teacher), "--steps", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "--steps 0 --num 16: sampling needs at least 1 step and 1 image" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
