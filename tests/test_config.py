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
