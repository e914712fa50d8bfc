"""Typed run configs: YAML in, strictly validated dataclasses out.

Every field carries its default (the paper's value where there is one) and a help
text. Unknown keys, wrong types and out-of-range values stop at once with a message
that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


def option(default: Any, help: str):
    """A dataclass field with a default and a help text (lists and dicts are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check_range(name: str, value, low=None, high=None, low_open=False):
    """Raise a ConfigError naming `name` when `value` lies outside [low, high] (or (low, high])."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} = {value!r} is out of range; allowed: {bracket}{lo}, {hi}]")


@dataclass
class DataConfig:
    dataset: Literal["digits", "folder", "prompts", "pairs", "none"] = option(
        "digits", "digits: the embedded scikit-learn digits; folder: images with captions; "
        "prompts: a text file of prompts (data-free); pairs: a folder of reflow noise-sample pairs "
        "(stepdistill reflow-pairs); none: conditions only, no images")
    path: str | None = option(None, "folder or prompt file for dataset=folder|prompts|pairs")
    resolution: int | None = option(None, "image size for dataset=folder (defaults to the teacher's sample size)")
    num_workers: int = option(0, "DataLoader worker processes")
    cache_text_embeddings: bool = option(True, "encode each prompt once and keep the embeddings in memory")
    text_embeddings: str | None = option(None, "safetensors file of precomputed prompt embeddings "
                                               "(stepdistill.text.precompute_text_embeddings); its prompts skip the text encoders")

    def __post_init__(self):
        check_range("data.num_workers", self.num_workers, 0)
        if self.dataset in ("folder", "prompts", "pairs") and not self.path:
            raise ConfigError(f"data.dataset = {self.dataset!r} needs data.path (a folder or a prompt file)")


@dataclass
class GroupConfig:
    """Optimizer settings of one trainable network (`train.groups.<name>`); unset values are the global ones."""

    learning_rate: float | None = option(None, "peak learning rate (default: train.learning_rate)")
    adam_beta1: float | None = option(None, "AdamW beta1 (default: train.adam_beta1)")
    adam_beta2: float | None = option(None, "AdamW beta2 (default: train.adam_beta2)")
    weight_decay: float | None = option(None, "AdamW decoupled weight decay (default: train.weight_decay)")
    max_grad_norm: float | None = option(None, "gradient clipping norm (default: train.max_grad_norm; 0: no clipping)")
    loss_scale: float = option(1.0, "multiplies this network's loss before backward (SiD: 100 for the generator); "
                                    "Adam is nearly invariant to it, clipping is not")

    def __post_init__(self):
        _check_optimizer_values("train.groups.<name>", self)
        check_range("train.groups.<name>.loss_scale", self.loss_scale, 0, low_open=True)


def _check_optimizer_values(prefix: str, c) -> None:
    if c.learning_rate is not None:
        check_range(f"{prefix}.learning_rate", c.learning_rate, 0, low_open=True)
    for name in ("adam_beta1", "adam_beta2"):
        if getattr(c, name) is not None:
            check_range(f"{prefix}.{name}", getattr(c, name), 0, 1)
            if getattr(c, name) == 1:
                raise ConfigError(f"{prefix}.{name} = 1 never forgets; use a value below 1 (AdamW: 0.9 / 0.999)")
    if c.weight_decay is not None:
        check_range(f"{prefix}.weight_decay", c.weight_decay, 0)
    if c.max_grad_norm is not None:
        check_range(f"{prefix}.max_grad_norm", c.max_grad_norm, 0)


@dataclass
class TrainConfig:
    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(64, "examples per device per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(1e-4, "peak learning rate (of every trainable network without its own in train.groups)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(1e-2, "AdamW decoupled weight decay")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = option(
        "constant_with_warmup", "learning-rate schedule")
    lr_warmup_steps: int = option(0, "linear warm-up steps")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm per group (null or 0: no clipping)")
    groups: dict[str, GroupConfig] = option({}, "per-network optimizer settings by trainable network name, e.g. "
                                                "{fake_score: {learning_rate: 2e-6}}; unset values are the ones above")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "autocast precision of the student's forward")
    allow_tf32: bool = option(True, "CUDA: TF32 tensor cores for fp32 matmuls and convolutions (the fp32 parts of "
                                    "mixed precision, fp32 runs); false: full fp32")
    ema_decays: list[float] = option([], "EMA rates of the student kept during training, e.g. [0.999, 0.9999]")
    ema_warmup: bool = option(False, "use min(decay, (1+n)/(10+n)) early in training, as diffusers' EMAModel")
    export_weights: str = option("auto", "weights written at export: 'student', 'ema_<decay>', or auto (the slowest EMA if any)")
    checkpoint_every: int = option(500, "optimizer steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept; older ones are deleted after a new one is whole")
    max_consecutive_nonfinite: int = option(10, "a network's update with a NaN/inf loss or gradient is skipped; "
                                                "this many in a row stop the run (its last checkpoint is kept)")
    resume: str = option("auto", "auto: latest checkpoint in output_dir if any; none; or a checkpoint directory")
    log_every: int = option(10, "optimizer steps between tracker logs")
    sample_every: int = option(0, "optimizer steps between PNG sample grids (0: only at the end)")
    num_sample_images: int = option(16, "images in each sample grid")
    report_to: Literal["tensorboard", "none"] = option("tensorboard", "tracker (used when installed)")
    progress_bar: bool = option(True, "show a tqdm progress bar")

    def __post_init__(self):
        check_range("train.max_steps", self.max_steps, 1)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_optimizer_values("train", self)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        check_range("train.max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1)
        for d in self.ema_decays:
            check_range("train.ema_decays[]", d, 0, 1)


@dataclass
class ExportConfig:
    steps: list[int] = option([1, 2, 4], "student step counts to sample and evaluate; the first sets the scheduler default")
    lora_only: bool = option(False, "for LoRA students, write only the LoRA (load_lora_weights) and not the fused pipeline")

    def __post_init__(self):
        if not self.steps or any(s < 1 for s in self.steps):
            raise ConfigError(f"export.steps = {self.steps!r}: give a non-empty list of positive step counts")


@dataclass
class KernelsConfig:
    attention: Literal["auto", "triton", "xformers", "sdpa"] = option(
        "auto", "attention backend; auto: PyTorch SDPA, except shapes where a recorded GPU measurement "
        "showed the Triton kernel faster (none yet); triton / xformers: explicitly")
    ema: Literal["auto", "fused", "foreach"] = option(
        "auto", "EMA update: fused Triton kernel on CUDA, a cache-blocked multi-rate update on CPU; "
        "foreach: torch._foreach_lerp_ per rate")


@dataclass
class EvalConfig:
    every: int = option(0, "optimizer steps between FID evaluations logged to the trackers (0: never)")
    num_samples: int = option(1000, "samples per FID evaluation")
    steps: list[int] = option([], "student step counts evaluated during training (default: export.steps)")


@dataclass
class StageSpec:
    """One entry of a config's `stages:` list (stepdistill.stages): a named piece of the run, in order."""

    name: str = option("", "the stage's name; its output goes to output_dir/<name>")
    kind: str = option("train", "train: a training run of the config with `options` as overrides; or a registered "
                                "generation / assembly stage (stepdistill.stages.STAGE_KINDS)")
    options: dict = option({}, "train: dotted config overrides (e.g. {method: reflow, train.max_steps: 500}); "
                               "other kinds: their own options. '${stages.NAME}' is stage NAME's output (a training "
                               "stage's exported student, else its folder)")

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"stages[].name = {self.name!r}: give each stage a plain folder name")


@dataclass
class RunConfig:
    method: str = option("cd", "distillation method, by registry name")
    teacher: str = option("samples/digits-teacher", "teacher pipeline directory or hub id (safetensors only)")
    vae: str | None = option(None, "a VAE (AutoencoderKL folder or hub id) replacing the teacher's, e.g. "
                                   "madebyollin/sdxl-vae-fp16-fix, which SDXL needs to run its VAE in fp16")
    output_dir: str = option("runs/default", "where checkpoints, samples, logs and the exported student go")
    seed: int = option(0, "seed of data order, noise and initialisation")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: Any = None  # the method's own config dataclass, resolved from `method`
    export: ExportConfig = field(default_factory=ExportConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[StageSpec] = option([], "the run as named stages, in order (empty: the method's own stages)")


# ----------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    """Check `value` against the annotation `tp`, converting ints to floats and lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is Literal:
        value = _yaml_word(value, args)
        if value not in args:
            raise ConfigError(f"{where} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} should be a list")
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r} should be a mapping")
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} should be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} should be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} should be true or false")
        return value
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: YAML reads yes/no/on/off as booleans; quote the word "
                              f"(e.g. {where.rsplit('.', 1)[-1]}: 'no') if you meant a string")
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} should be a string")
        return value
    return value


# YAML 1.1 reads these words as booleans; a choice among strings takes them back as the word the user wrote
_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _yaml_word(value, choices):
    """A boolean where a Literal of strings is expected: the one choice spelled as a YAML boolean word."""
    if not isinstance(value, bool):
        return value
    words = [w for w in _BOOL_WORDS[value] if w in choices]
    return words[0] if len(words) == 1 else value


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a did-you-mean hint."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} should be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint or '.'} Valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None
    except ConfigError as e:  # a group's own checks do not know its name; `where` does
        if "train.groups.<name>" in str(e) and where:
            raise ConfigError(str(e).replace("train.groups.<name>", where)) from None
        raise


def to_dict(obj) -> dict:
    """A plain dict (for YAML, JSON, trackers and model cards)."""
    return dataclasses.asdict(obj)


def _set_dotted(data: dict, dotted: str, value):
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings; values are parsed as YAML (so 1e-4, true, [1,2] work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' should look like key.sub=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return data


def yaml_problem(e: Exception) -> str:
    """A YAML parse error on one line: what and where (PyYAML's own message spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}; fix the file's syntax"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} should hold a mapping of config sections")
    return data


def build_config(data: dict) -> RunConfig:
    """Validate a raw dict into a RunConfig, parsing `distill` with the chosen method's config class."""
    from .distillers import get_distiller_class

    data = dict(data)
    distill = data.pop("distill", None)
    cfg = from_dict(RunConfig, data)
    distiller_cls = get_distiller_class(cfg.method)
    cfg.distill = from_dict(distiller_cls.config_class, distill, "distill")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply key=value overrides, and validate everything."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return build_config(data)
