import pytest

from stepdistill.config import build_config, load_config
from stepdistill.distillers.consistency import ConsistencyConfig
from stepdistill.errors import ConfigError
from stepdistill.paths import CONFIGS


def test_unknown_key_names_the_key_and_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'; did you mean 'learning_rate'"):
        build_config({"train": {"learning_rat": 1e-4}})


def test_wrong_type_and_range_and_choice_are_rejected():
    with pytest.raises(ConfigError, match=r"train.max_steps = 'ten' should be an integer"):
        build_config({"train": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"distill.target_ema_decay = 1.5 is out of range"):
        build_config({"method": "cd", "distill": {"target_ema_decay": 1.5}})
    with pytest.raises(ConfigError, match=r"train.mixed_precision = 'fp8' is not allowed; choose one of"):
        build_config({"train": {"mixed_precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; available: .*cd"):
        build_config({"method": "nope"})


def test_overrides_parse_yaml_values_and_method_config_is_typed():
    cfg = load_config(CONFIGS / "digits/consistency.yaml",
                      ["train.max_steps=7", "train.ema_decays=[0.9, 0.99]", "distill.huber_c=2e-3", "output_dir=x"])
    assert cfg.train.max_steps == 7 and cfg.train.ema_decays == [0.9, 0.99]
    assert isinstance(cfg.distill, ConsistencyConfig) and cfg.distill.huber_c == 0.002
    assert cfg.output_dir == "x"
    with pytest.raises(ConfigError, match="should look like key.sub=value"):
        load_config(CONFIGS / "digits/consistency.yaml", ["train.max_steps"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_boolean_words_are_read_as_the_choice_the_user_wrote(tmp_path):
    """YAML reads `no` as false; accelerate's own spelling `mixed_precision: no` must still work."""
    path = tmp_path / "run.yaml"
    path.write_text("method: cd\ntrain:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(CONFIGS / "digits/consistency.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="YAML reads yes/no/on/off as booleans; quote the word"):
        load_config(CONFIGS / "digits/consistency.yaml", ["train.resume=no"])


def test_per_network_settings_are_validated_with_their_name():
    cfg = load_config(CONFIGS / "digits/consistency.yaml", ["train.groups.student.learning_rate=3e-4"])
    assert cfg.train.groups["student"].learning_rate == 3e-4 and cfg.train.groups["student"].adam_beta1 is None
    with pytest.raises(ConfigError, match=r"train.groups.student.adam_beta2 = 1.5 is out of range"):
        load_config(CONFIGS / "digits/consistency.yaml", ["train.groups.student.adam_beta2=1.5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.groups.student.lr'. Valid keys here: learning_rate, "):
        load_config(CONFIGS / "digits/consistency.yaml", ["train.groups.student.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"train.groups.fake.loss_scale = 0.0 is out of range"):
        load_config(CONFIGS / "digits/consistency.yaml", ["train.groups.fake.loss_scale=0"])
