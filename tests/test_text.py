"""Text conditioning: each family's kwargs equal what its diffusers pipeline computes; null prompts; caching."""

import pytest
import torch

from stepdistill import StepdistillError, load_teacher
from stepdistill.text import precompute_text_embeddings, text_conditioner_for

PROMPTS = ["a red cat", "the blue dog on a table"]


def test_sd15_embeddings_match_the_pipeline(sd15_teacher):
    t = load_teacher(str(sd15_teacher))
    assert t.conditioner.kind == "text"
    kwargs = t.conditioner.encode({"prompt": PROMPTS}, "cpu")
    expected, _ = t.pipeline.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], expected)
    null = t.conditioner.null()
    torch.testing.assert_close(null["encoder_hidden_states"], t.pipeline.encode_prompt([""], "cpu", 1, False)[0])


def test_sdxl_pooled_time_ids_and_zero_null(sdxl_teacher):
    t = load_teacher(str(sdxl_teacher))
    kwargs = t.conditioner.encode({"prompt": PROMPTS}, "cpu")
    embeds, _, pooled, _ = t.pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled)
    size = 8 * t.pipeline.vae_scale_factor
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], torch.tensor([[size, size, 0, 0, size, size]] * 2).float())
    null = t.conditioner.null()  # force_zeros_for_empty_prompt, as SDXL's pipeline and LCM-LoRA's script
    assert null["encoder_hidden_states"].abs().sum() == 0 and null["added_cond_kwargs"]["text_embeds"].abs().sum() == 0
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # guidance runs through the nested added_cond_kwargs
        assert torch.isfinite(t.denoiser.x0(x, torch.tensor([0.4, 0.8]), kwargs, guidance=5.0)).all()


def test_sd3_pooled_projections(sd3_teacher):
    t = load_teacher(str(sd3_teacher))
    kwargs = t.conditioner.encode({"prompt": PROMPTS}, "cpu")
    embeds, _, pooled, _ = t.pipeline.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                    do_classifier_free_guidance=False)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds)
    torch.testing.assert_close(kwargs["pooled_projections"], pooled)
    assert t.denoiser.prediction_type == "flow"


def test_cache_and_precomputed_embeddings(sd15_teacher, tmp_path):
    t = load_teacher(str(sd15_teacher))
    path = precompute_text_embeddings(t, PROMPTS, tmp_path / "emb.safetensors")
    fresh = load_teacher(str(sd15_teacher)).conditioner
    fresh.load(path)
    assert sorted(fresh.cache) == sorted(PROMPTS)
    fresh.pipe.text_encoder = None  # precomputed prompts never reach the encoder
    fresh.pipe.register_to_config(text_encoder=(None, None))
    got = fresh.encode({"prompt": PROMPTS[::-1]}, "cpu")
    expected = t.conditioner.encode({"prompt": PROMPTS[::-1]}, "cpu")
    torch.testing.assert_close(got["encoder_hidden_states"], expected["encoder_hidden_states"])
    other = load_teacher(str(sd15_teacher)).conditioner
    other.__class__ = type("OtherConditioner", (type(other),), {})
    with pytest.raises(StepdistillError, match="embeddings of a SD15TextConditioner"):
        other.load(path)


def test_unsupported_text_pipeline_is_a_clear_error():
    class KandinskyLikePipeline:
        text_encoder = object()

    with pytest.raises(StepdistillError, match="not supported yet"):
        text_conditioner_for(KandinskyLikePipeline())
