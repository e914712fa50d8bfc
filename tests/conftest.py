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

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and CI's two cores are then free for the two-process tests.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def class_teacher(tmp_path_factory):
    """A saved tiny class-conditional teacher (the digits teacher's architecture at toy size)."""
    from tiny_models import save_class_teacher

    return save_class_teacher(tmp_path_factory.mktemp("teachers") / "class")


@pytest.fixture(scope="session")
def uncond_teacher(tmp_path_factory):
    """A saved tiny unconditional DDPMPipeline."""
    from tiny_models import save_unconditional_teacher

    return save_unconditional_teacher(tmp_path_factory.mktemp("teachers") / "uncond")
