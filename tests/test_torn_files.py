"""No torn file is read as whole: generation shards and FID statistics caches killed mid-write (SIGKILL in a forked
child) or cut short by something else are made again, and equal the uninterrupted run's bit for bit."""

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_injection import forked
from stepdistill.files import readable_safetensors
from stepdistill.stages import GenerationStage

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills run in forked children")


class Draws(GenerationStage):
    def make_shard(self, index, start, count, generator):
        return {"noise": torch.randn(count, 4, generator=generator), "i": torch.arange(start, start + count)}


def draws(folder):
    return Draws("draws", folder, num_items=11, shard_size=2, seed=3, settings={"what": "draws"})


def _kill_at_write(n):
    """Patch safetensors' writer: the n-th file is written half-way, then the process is SIGKILLed."""
    import safetensors.torch as st

    real, calls = st.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == n:
            data = st.save(tensors, metadata)
            Path(filename).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, filename, metadata=metadata)

    st.save_file = save_file


def _shards(folder):
    files = sorted(Path(folder).glob("shard-*.safetensors"))
    return {p.name: {k: v.clone() for k, v in load_file(str(p)).items()} for p in files}  # not views of the file


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


@pytest.mark.parametrize("kill_at", [1, 3, 6])
def test_generation_killed_mid_shard_resumes_to_the_same_shards(tmp_path, kill_at):
    draws(tmp_path / "full").run()

    def killed():
        _kill_at_write(kill_at)
        draws(tmp_path / "part").run()

    assert forked(killed) == -signal.SIGKILL
    assert not draws(tmp_path / "part").finished()
    draws(tmp_path / "part").run()
    assert draws(tmp_path / "part").finished()
    assert _same(_shards(tmp_path / "full"), _shards(tmp_path / "part"))


def test_a_shard_torn_under_its_final_name_is_made_again(tmp_path):
    stage = draws(tmp_path)
    stage.run()
    full = _shards(tmp_path)
    shard = tmp_path / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])  # cut short by a copy, a full disk or an older writer
    assert readable_safetensors(shard) is None and not stage.finished()
    stage.run()
    assert stage.finished() and _same(_shards(tmp_path), full)


def test_fid_statistics_cache_torn_or_killed_mid_write_is_computed_again():
    from stepdistill.eval.features import DIGITS_EXTRACTOR
    from stepdistill.eval.fid import cache_dir, cached_statistics, create_extractor
    from stepdistill.eval.sources import TensorSource

    images = torch.randint(0, 256, (12, 1, 16, 16), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    source = TensorSource(images, "torn-cache-test")
    extractor = create_extractor(DIGITS_EXTRACTOR, device="cpu")

    def compute():
        return cached_statistics(source, extractor, batch_size=4, progress=False)

    def killed():
        _kill_at_write(1)
        compute()

    assert forked(killed) == -signal.SIGKILL
    assert not list((cache_dir() / "fid-stats").glob("torn-cache-test-*.safetensors"))  # only a temporary file
    first = compute()
    [path] = (cache_dir() / "fid-stats").glob("torn-cache-test-*.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = compute()  # the torn cache is not read: computed and written again
    assert readable_safetensors(path) is not None
    assert torch.equal(torch.from_numpy(first.mu), torch.from_numpy(again.mu))
    assert torch.equal(first.features, again.features)
