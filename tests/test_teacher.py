import pytest
from diffusers import DDPMPipeline

from stepdistill import StepdistillError, load_teacher
from stepdistill.pipelines import ClassConditionalPipeline


def test_loads_class_conditional_teacher(class_teacher):
    t = load_teacher(str(class_teacher))
    assert isinstance(t.pipeline, ClassConditionalPipeline)
    assert t.conditioner.kind == "class" and t.sample_shape == (1, 8, 8)
    assert t.denoiser.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in t.model.parameters())


def test_loads_unconditional_teacher(uncond_teacher):
    t = load_teacher(str(uncond_teacher))
    assert isinstance(t.pipeline, DDPMPipeline) and t.conditioner.kind == "unconditional"
    assert t.denoiser.null_cond is None


def test_refuses_pickle_only_weights(tmp_path, uncond_teacher):
    import shutil

    bad = tmp_path / "pickled"
    shutil.copytree(uncond_teacher, bad)
    unet = bad / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(StepdistillError, match=r"only pickle weights \(diffusion_pytorch_model.bin\).*safetensors"):
        load_teacher(str(bad))


def test_clear_errors_for_missing_and_non_pipeline_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepdistillError, match="not a diffusers pipeline directory"):
        load_teacher(str(tmp_path / "empty"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(StepdistillError, match="single file"):
        load_teacher(str(f))
