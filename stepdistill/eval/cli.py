"""`stepdistill fid A B`: FID / KID / precision-recall / CLIP score between folders, pipelines, the embedded
digits and saved statistics; and `stepdistill fid --plot RUN.json ... --out plot.png`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StepdistillError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

EPILOG = """inputs (A is measured against B):
  DIR                a folder of images (png, jpg, webp, bmp; top level only)
  PIPELINE_DIR       a diffusers pipeline directory (has model_index.json), or a hub id; sampled --num-samples times
  digits             the embedded 1,797 scikit-learn digits
  STATS.safetensors  statistics written by --save-stats (FID only, or KID/PR when it holds features)

feature extractor (--extractor auto): the one a statistics file was made with, else the digits classifier when
an input is `digits`, else Inception: --inception-weights, then $STEPDISTILL_ASSETS/inception-2015-12-05-fid.pt,
then torch-fidelity's download (announced; never with HF_HUB_OFFLINE=1 or STEPDISTILL_OFFLINE=1).
Statistics of folders, digits and local pipelines are cached in $STEPDISTILL_CACHE (default ~/.cache/stepdistill).

examples:
  stepdistill fid samples/digits-teacher digits --steps 4 --num-samples 1000 --json t4.json
  stepdistill fid gen_images/ real_images/ --metrics fid,kid,prc --inception-weights inception-2015-12-05-fid.pt
  stepdistill fid real_images/ --save-stats real.safetensors
  accelerate launch -m stepdistill.cli fid runs/cd/student ref.safetensors --num-samples 50000
  stepdistill fid --plot runs/quickstart/results.json t*.json --out fid_vs_steps.png
"""


@dataclass
class Input:
    spec: str
    stats: object = None  # Statistics, when the input is a statistics file
    source: object = None  # ImageSource otherwise
    desc: dict = field(default_factory=dict)  # model / sampler / steps for pipelines

    @property
    def is_digits(self) -> bool:
        return self.spec == "digits"


def parse_metrics(text: str, clip: bool) -> list[str]:
    metrics = [m.strip().lower() for m in text.split(",") if m.strip()]
    metrics = ["prc" if m in ("pr", "precision", "recall", "precision-recall") else m for m in metrics]
    bad = [m for m in metrics if m not in ("fid", "kid", "prc", "clip")]
    if bad:
        raise StepdistillError(f"--metrics: unknown metric {bad[0]!r}; choose from fid, kid, prc, clip")
    if clip and "clip" not in metrics:
        metrics.append("clip")
    return metrics


def resolve_input(spec: str, args, device, save_dir) -> Input:
    from .fid import Statistics
    from .sources import FolderSource, digits_source, pipeline_source

    if spec == "digits":
        return Input(spec, source=digits_source(args.resolution))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise StepdistillError(f"{spec} is a file but not a statistics file (.safetensors); inputs are folders, "
                                   "pipeline directories, 'digits' or statistics files")
        return Input(spec, stats=Statistics.load(path))
    looks_hub = not path.exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if (path / "model_index.json").is_file() or looks_hub:
        try:
            source, desc = pipeline_source(spec, args.num_samples, args.steps, args.seed, args.guidance, args.classes,
                                           args.prompts, device, DTYPES[args.dtype], save_dir, args.label)
        except StepdistillError as e:
            if not looks_hub:
                raise
            raise StepdistillError(f"{spec} does not exist here, and as a hub pipeline id it did not load ({e})") \
                from None
        return Input(spec, source=source, desc=desc)
    return Input(spec, source=FolderSource(path, args.resolution))


def choose_extractor(args, inputs: list[Input]) -> tuple[str, str | None]:
    from ..paths import DIGITS_CLASSIFIER
    from .features import DIGITS_EXTRACTOR, INCEPTION_COMPAT, INCEPTION_SAFETENSORS, INCEPTION_TORCHSCRIPT, \
        resolve_inception

    choice = args.extractor
    if choice == "auto":
        made_with = [i.stats.extractor.split(":")[0] for i in inputs if i.stats is not None]
        if made_with:
            choice = made_with[0]
            if choice == DIGITS_EXTRACTOR:
                choice = "digits"
            elif choice in (INCEPTION_TORCHSCRIPT, INCEPTION_SAFETENSORS, INCEPTION_COMPAT):
                choice = "inception"
        elif any(i.is_digits for i in inputs):
            choice = "digits"
        else:
            choice = "inception"
    if choice == "digits":
        return DIGITS_EXTRACTOR, args.extractor_weights or str(DIGITS_CLASSIFIER)
    if choice == "inception":
        return resolve_inception(args.inception_weights)
    return choice, args.extractor_weights


def describe(inp: Input) -> str:
    if inp.desc:
        d = inp.desc
        return f"{inp.spec} ({d['sampler']}, {d['steps']} steps, {d['num_samples']} samples, seed {d['seed']})"
    if inp.stats is not None:
        return f"{inp.spec} (statistics of {inp.stats.source}, {inp.stats.num if inp.stats.num > 0 else '?'} samples)"
    return f"{inp.spec} ({len(inp.source)} images)"


def cmd_fid(args) -> None:
    from .features import DIGITS_EXTRACTOR
    from .fid import METRICS, Statistics, cached_statistics, compute_metrics, create_extractor, default_device, \
        extract, world
    from .report import append_markdown, format_table, plot_runs, write_json

    if args.plot:
        if args.inputs:
            raise StepdistillError("--plot takes run JSON files only; give no A/B inputs with it")
        print(f"plot written to {plot_runs(args.plot, args.out or 'fid_vs_steps.png', args.title)}")
        return
    if not 1 <= len(args.inputs) <= 2:
        raise StepdistillError("give two inputs, A (samples) and B (reference), or one input with --save-stats")
    metrics = parse_metrics(args.metrics, args.clip_model is not None)
    binary = [m for m in metrics if m in METRICS]
    if len(args.inputs) == 1 and binary and not args.save_stats:
        raise StepdistillError(f"{', '.join(binary)} compare two inputs: give B too (or --save-stats PATH to only "
                               "write A's statistics)")
    if args.save_stats and len(args.inputs) != 1:
        raise StepdistillError("--save-stats writes the statistics of one input; give only A")
    device = torch.device(args.device) if args.device else default_device()
    rank = world()[0]

    both_generated = sum((Path(s) / "model_index.json").is_file() for s in args.inputs) == 2
    inputs = []
    for name, spec in zip("AB", args.inputs):
        save_dir = None
        if args.save_samples:
            save_dir = Path(args.save_samples) / name if both_generated else Path(args.save_samples)
        inputs.append(resolve_input(spec, args, device, save_dir))
    a = inputs[0]
    if "clip" in metrics and not (a.source is not None and a.source.prompts(0, 1)):
        raise StepdistillError("CLIP score needs A to be a text-to-image pipeline sampled with --prompts FILE")

    extractor = None
    if binary or args.save_stats:
        extractor = create_extractor(*choose_extractor(args, inputs), device=device)
    batch_size = args.batch_size or (250 if extractor is not None and extractor.name == DIGITS_EXTRACTOR else 64)
    scorer = None
    if "clip" in metrics:
        from .clip_score import CLIPScorer

        scorer = CLIPScorer(args.clip_model, device)

    stats, record = [], {}
    for inp in inputs:
        if inp.stats is not None:
            stats.append(inp.stats)
            continue
        if inp is a and scorer is not None:
            src = inp.source
            out = extract(src, extractor, batch_size,
                          scorers={"clip": lambda images, start: scorer(images, src.prompts(start, len(images)))})
            record["clip_score"] = float(out["clip"].mean())
            if extractor is not None:
                stats.append(Statistics.from_features(out["features"], extractor.key, src.label))
        elif extractor is not None:
            stats.append(cached_statistics(inp.source, extractor, batch_size, cache=not args.no_cache))

    if args.save_stats:
        if rank == 0:
            print(f"statistics of {describe(a)} written to {stats[0].save(args.save_stats)}")
    if len(stats) == 2 and binary:
        measured = compute_metrics(stats[0], stats[1], binary, args.kid_subsets, args.kid_subset_size, args.seed + 2020)
        record = {**measured, **record}
    if rank != 0 or not record:
        return
    record.update({"a": describe(a), "b": describe(inputs[1]) if len(inputs) > 1 else None,
                   "extractor": extractor.name if extractor else None, **a.desc})
    if args.label:
        record["model"] = args.label
    if "kid_mean" in record:
        record["kid_subset_size"] = min(args.kid_subset_size, *(s.num for s in stats))
    print(format_table(record))
    if args.json:
        print(f"json: {write_json(record, args.json)}")
    if args.markdown:
        print(f"markdown row appended to {append_markdown(record, args.markdown)}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fid", help="FID / KID / precision-recall / CLIP score of folders, pipelines, statistics",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="A (samples) then B (reference); see below")
    p.add_argument("--metrics", default="fid", help="comma list of fid, kid, prc (precision/recall), clip")
    p.add_argument("--extractor", default="auto",
                   help="auto, inception, digits, or any torch-fidelity extractor name (e.g. dinov2-vit-b-14)")
    p.add_argument("--inception-weights", default=None,
                   help="inception-2015-12-05-fid.pt (TorchScript) or torch-fidelity's weights as .safetensors")
    p.add_argument("--extractor-weights", default=None,
                   help="weights of a non-Inception extractor (digits: a classifier folder)")
    p.add_argument("--resolution", type=int, default=None,
                   help="centre-crop and resize folder images (and the digits) to this size")
    g = p.add_argument_group("pipelines")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's own)")
    g.add_argument("--num-samples", type=int, default=1000, help="samples drawn from each pipeline input")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale")
    g.add_argument("--classes", type=int, nargs="+", default=None, help="class labels, cycled (default: all, balanced)")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line, cycled (text-to-image pipelines)")
    g.add_argument("--seed", type=int, default=0, help="sample i uses a generator seeded from (seed, i)")
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    g.add_argument("--save-samples", default=None, help="write the generated samples here as PNG")
    g.add_argument("--clip-model", default=None, help="CLIPModel directory: adds the CLIP score of A's samples")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per generation / feature batch (default: 250 with the digits extractor, else 64)")
    p.add_argument("--device", default=None, help="default: this process's accelerator, else cpu")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the smaller input's size")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics (and do not store them)")
    p.add_argument("--save-stats", default=None, help="write A's statistics (safetensors) for later runs")
    p.add_argument("--label", default=None, help="the model's name in --json / --markdown / plots")
    p.add_argument("--json", default=None, help="write the metrics as one JSON object")
    p.add_argument("--markdown", default=None, help="append a row to this markdown table")
    p.add_argument("--plot", nargs="+", default=None, metavar="RUN_JSON",
                   help="draw FID against steps from quickstart results.json / --json files")
    p.add_argument("--out", default=None, help="PNG path for --plot")
    p.add_argument("--title", default=None, help="title for --plot")
    p.set_defaults(func=cmd_fid)
    return p
