"""Stages: training runs listed in a config's `stages:`, resumable generation shards, and assembly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_config
from stepdistill.errors import ConfigError, StepdistillError
from stepdistill.stages import AssemblyStage, GenerationStage, build_stages, run_stages


class Squares(GenerationStage):
    """Items i -> (i, i^2, a seeded random draw); counts shards made in this process."""

    made: list

    def make_shard(self, index, start, count, generator):
        self.made.append(index)
        i = torch.arange(start, start + count)
        return {"i": i, "square": i * i, "noise": torch.randn(count, generator=generator)}


def squares(folder, **kw):
    stage = Squares("squares", folder, num_items=10, shard_size=3, seed=7, settings={"what": "squares"}, **kw)
    stage.made = []
    return stage


def test_generation_keeps_whole_shards_and_redoes_torn_ones(tmp_path):
    full = squares(tmp_path / "full")
    full.run()
    assert full.finished() and full.made == [0, 1, 2, 3]
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [3, 3, 3, 1]

    # a crash: shards 0 and 2 whole, shard 1 torn mid-write (its temporary file), shard 3 never started
    part = squares(tmp_path / "part")
    part.run()
    for name in ("shard-00001.safetensors", "shard-00003.safetensors"):
        (tmp_path / "part" / name).unlink()
    (tmp_path / "part" / "shard-00001.safetensors.tmp").write_bytes(b"torn")
    again = squares(tmp_path / "part")
    assert not again.finished()
    again.run()
    assert again.made == [1, 3] and again.finished()
    for k in range(4):  # every shard equals the uninterrupted run's (a pure function of seed and index)
        a = load_file(str(tmp_path / "full" / f"shard-{k:05d}.safetensors"))
        b = load_file(str(tmp_path / "part" / f"shard-{k:05d}.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert torch.equal(load_file(str(tmp_path / "part" / "shard-00003.safetensors"))["square"], torch.tensor([81]))


def test_generation_refuses_a_folder_of_other_settings(tmp_path):
    squares(tmp_path).run()
    other = Squares("squares", tmp_path, num_items=12, shard_size=3, seed=7, settings={"what": "squares"})
    with pytest.raises(StepdistillError, match="holds shards made with other settings"):
        other.finished()


def test_assembly_runs_once_and_replaces_its_output_only_when_whole(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    calls = []

    def assemble(inputs, out):
        calls.append(1)
        (out / "sum.txt").write_text(inputs["a"].joinpath("x.txt").read_text() + "+1")

    def broken(inputs, out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("crashed while assembling")

    with pytest.raises(RuntimeError):
        AssemblyStage("final", tmp_path / "final", {"a": tmp_path / "a"}, broken).run()
    stage = AssemblyStage("final", tmp_path / "final", {"a": tmp_path / "a"}, assemble)
    assert not stage.finished() and not (tmp_path / "final").exists()
    run_stages([stage, stage])
    assert calls == [1] and (tmp_path / "final" / "sum.txt").read_text() == "1+1"
    with pytest.raises(StepdistillError, match="needs .*nope"):
        AssemblyStage("x", tmp_path / "x", {"b": tmp_path / "nope"}, assemble).run()


def test_yaml_stages_chain_training_runs_through_their_outputs(class_teacher, tmp_path):
    stages_yaml = ('[{name: first, options: {train.max_steps: 1}}, '
                   '{name: second, options: {teacher: "${stages.first}", train.max_steps: 2, distill.huber_c: 0.01}}]')
    cfg = tiny_config("digits/consistency.yaml", class_teacher, tmp_path, f"stages={stages_yaml}")
    stages = build_stages(cfg)
    assert [s.name for s in stages] == ["first", "second"]
    assert stages[1].config.teacher == str(tmp_path / "first" / "student")
    assert stages[1].config.distill.huber_c == 0.01 and stages[0].config.distill.huber_c == 0.001
    assert stages[0].config.train.max_steps == 1 and stages[1].config.stages == []
    run_stages(stages)
    assert all(s.finished() for s in stages)
    assert (tmp_path / "second" / "student" / "model_index.json").is_file()


def test_yaml_stage_mistakes_are_named(class_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\] \(b\): '\$\{stages.c\}' names no earlier stage"):
        build_stages(tiny_config("digits/consistency.yaml", class_teacher, tmp_path,
                                 'stages=[{name: a}, {name: b, options: {teacher: "${stages.c}"}}]'))
    with pytest.raises(ConfigError, match="unknown stage kind 'shuffle'"):
        build_stages(tiny_config("digits/consistency.yaml", class_teacher, tmp_path,
                                 "stages=[{name: a, kind: shuffle}]"))
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        build_stages(tiny_config("digits/consistency.yaml", class_teacher, tmp_path,
                                 "stages=[{name: a, options: {train.max_step: 3}}]"))
    with pytest.raises(ConfigError, match="give each stage a plain folder name"):
        tiny_config("digits/consistency.yaml", class_teacher, tmp_path, "stages=[{name: ../a}]")
