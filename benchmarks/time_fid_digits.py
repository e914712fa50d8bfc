"""Wall time of one digits FID evaluation, split into its parts: the same calls `stepdistill fid` makes.

    python benchmarks/time_fid_digits.py [--num-samples 10000] [--steps 4] [--pipeline samples/digits-teacher]

Parts: loading the pipeline and the extractor; the reference statistics of the 1,797 digits (computed with
an empty cache, then read from it); generating the samples and embedding them (one streamed loop, as in the
CLI; the time inside the extractor is counted apart); the moments and torch-fidelity's Frechet distance.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


class Timed:
    """The extractor, with the time spent in it counted."""

    def __init__(self, extractor):
        self.extractor, self.seconds = extractor, 0.0

    def __call__(self, images):
        t = time.perf_counter()
        out = self.extractor(images)
        self.seconds += time.perf_counter() - t
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", default="samples/digits-teacher")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args()
    os.environ["STEPDISTILL_CACHE"] = tempfile.mkdtemp()  # start from an empty cache

    from stepdistill.eval.features import DIGITS_EXTRACTOR
    from stepdistill.eval.fid import Statistics, cached_statistics, create_extractor, extract, frechet_distance
    from stepdistill.eval.sources import digits_source, pipeline_source
    from stepdistill.paths import DIGITS_CLASSIFIER

    times = {}
    t = time.perf_counter()
    source, desc = pipeline_source(args.pipeline, args.num_samples, args.steps, seed=0, device="cpu")
    extractor = create_extractor(DIGITS_EXTRACTOR, DIGITS_CLASSIFIER, "cpu")
    times["load pipeline + extractor"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = cached_statistics(digits_source(), extractor, args.batch_size, progress=False)
    times["reference statistics (computed)"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = cached_statistics(digits_source(), extractor, args.batch_size, progress=False)
    times["reference statistics (from cache)"] = time.perf_counter() - t
    timed = Timed(extractor)
    t = time.perf_counter()
    feats = extract(source, timed, args.batch_size)["features"]
    loop = time.perf_counter() - t
    times[f"generate {args.num_samples} samples ({desc['steps']} steps, to uint8)"] = loop - timed.seconds
    times[f"features of {args.num_samples} samples"] = timed.seconds
    t = time.perf_counter()
    fid = frechet_distance(Statistics.from_features(feats, extractor.key, "samples"), ref)
    times["moments + Frechet distance"] = time.perf_counter() - t
    print(f"{desc['sampler']} {desc['steps']} steps, {args.num_samples} samples: FID {fid:.3f}  "
          f"(torch threads: {torch.get_num_threads()}, os.cpu_count: {os.cpu_count()})")
    for k, v in times.items():
        print(f"  {k:<55}{v:8.1f} s")
    total = sum(v for k, v in times.items() if "from cache" not in k)
    print(f"  {'total (empty cache)':<55}{total:8.1f} s")


if __name__ == "__main__":
    main()
