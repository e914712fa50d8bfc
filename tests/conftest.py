"""Shared test setup. Triton kernels run on the CPU through the interpreter, which must be
switched on before triton is first imported."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# FID reference statistics (stepdistill.eval) go to a throw-away cache, not ~/.cache/stepdistill
if "STEPDISTILL_CACHE" not in os.environ:
    os.environ["STEPDISTILL_CACHE"] = tempfile.mkdtemp(prefix="stepdistill-test-cache-")
    atexit.register(shutil.rmtree, os.environ["STEPDISTILL_CACHE"], ignore_errors=True)
# the offline LPIPS backbone (CI exports the same folder; see ../shared/assets/README.md)
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "assets")
if os.path.isdir(_ASSETS):
    os.environ.setdefault("STEPDISTILL_ASSETS", os.path.normpath(_ASSETS))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and CI's two cores are then free for the two-process tests.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _all_cores_for_end_to_end_runs(request):
    """The slow end-to-end runs train the real digits student: they get every core, as the quickstart does."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def class_teacher(tmp_path_factory):
    """A saved tiny class-conditional teacher (the digits teacher's architecture at toy size)."""
    from tiny_models import save_class_teacher

    return save_class_teacher(tmp_path_factory.mktemp("teachers") / "class")


@pytest.fixture(scope="session")
def flow_class_teacher(tmp_path_factory):
    """The tiny class-conditional teacher as a flow-matching model (shift 3)."""
    from tiny_models import save_class_flow_teacher

    return save_class_flow_teacher(tmp_path_factory.mktemp("teachers") / "flow-class", shift=3.0)


@pytest.fixture(scope="session")
def class_flow_teacher(tmp_path_factory):
    """A saved tiny class-conditional flow-matching teacher (the flow digits teacher's kind at toy size)."""
    from tiny_models import save_class_flow_teacher

    return save_class_flow_teacher(tmp_path_factory.mktemp("teachers") / "class-flow")


@pytest.fixture(scope="session")
def uncond_teacher(tmp_path_factory):
    """A saved tiny unconditional DDPMPipeline."""
    from tiny_models import save_unconditional_teacher

    return save_unconditional_teacher(tmp_path_factory.mktemp("teachers") / "uncond")


@pytest.fixture(scope="session")
def sd15_teacher(tmp_path_factory):
    """A saved tiny StableDiffusionPipeline (epsilon, scaled_linear, CLIP text)."""
    from tiny_models import save_sd15_teacher

    return save_sd15_teacher(tmp_path_factory.mktemp("teachers") / "sd15")


@pytest.fixture(scope="session")
def sdxl_teacher(tmp_path_factory):
    """A saved tiny StableDiffusionXLPipeline (two CLIP encoders, added_cond_kwargs)."""
    from tiny_models import save_sdxl_teacher

    return save_sdxl_teacher(tmp_path_factory.mktemp("teachers") / "sdxl")


@pytest.fixture(scope="session")
def sd3_teacher(tmp_path_factory):
    """A saved tiny StableDiffusion3Pipeline (flow matching, shift 3, CLIP-L/G without T5)."""
    from tiny_models import save_sd3_teacher

    return save_sd3_teacher(tmp_path_factory.mktemp("teachers") / "sd3")


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory):
    """Eight 16x16 RGB images with captions (metadata.jsonl)."""
    from tiny_models import write_caption_folder

    return write_caption_folder(tmp_path_factory.mktemp("data") / "captions")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    """A prompt list for data-free distillation."""
    from tiny_models import write_prompt_file

    return write_prompt_file(tmp_path_factory.mktemp("data") / "prompts.txt")


@pytest.fixture(scope="session")
def quickstart_dir(tmp_path_factory):
    """One output folder for the slow full-length quickstart runs, so the teacher's rows (cached per teacher,
    sample count and seed in teacher_rows.json) are measured once, not once per method."""
    return tmp_path_factory.mktemp("quickstart")

