"""`stepdistill train|sample|export|fid|quickstart`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import StepdistillError


def cmd_train(args):
    from .config import load_config
    from .runner import run_stages

    report_stages(run_stages(load_config(args.config, args.overrides)))


def report_stages(stages) -> None:
    for stage in stages:
        if stage.student_dir is not None:
            print(f"student written to {stage.student_dir}")


def train_script(doc: str, default_config: str, family: str, argv=None) -> int:
    """The body of scripts/train_<family>.py: `--config FILE key=value ...`, refused for other families' methods."""
    from .config import load_config
    from .distillers import family_methods
    from .runner import run_stages

    methods = family_methods(family)
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.method not in methods:
            raise StepdistillError(f"{args.config}: method {cfg.method!r} is not one of this script's "
                                   f"({', '.join(methods)}); use `stepdistill train {args.config}`")
        report_stages(run_stages(cfg))
    except StepdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_quickstart(args):
    from .quickstart import quickstart, quickstart_configs

    methods = list(quickstart_configs()) if args.method == "all" else [args.method]
    quickstart(methods, args.output_dir, num_samples=args.num_samples, seed=args.seed, overrides=args.overrides,
               teacher=args.teacher)


def cmd_sample(args):
    from .sampling import sample_pipeline_grid

    path = sample_pipeline_grid(args.pipeline, steps=args.steps, num=args.num, out=args.out, seed=args.seed,
                                guidance=args.guidance, classes=args.classes, prompts=args.prompt)
    print(f"grid written to {path}")


def cmd_export(args):
    from .runner import export_run

    out = export_run(args.run_dir, steps=args.steps, weights=args.weights, out=args.out)
    print(f"student written to {out}")


def cmd_reflow_pairs(args):
    from .reflow_pairs import ReflowPairs, options_from

    opts = options_from({"num": args.num, "steps": args.steps, "solver": args.solver,
                         "guidance_scale": args.guidance_scale, "seed": args.seed, "shard_size": args.shard_size,
                         "batch_size": args.batch_size, "prompts": args.prompts}, "reflow-pairs")
    stage = ReflowPairs("reflow-pairs", args.out, args.teacher, opts)
    if stage.finished():
        print(f"{args.out} already holds these {args.num} pairs")
        return
    stage.run()
    print(f"pairs written to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepdistill", description="Distil diffusion and flow models into few-step students.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student from a YAML config")
    t.add_argument("config", help="training config (YAML), e.g. training_configs/digits/consistency.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser("quickstart", help="distil the embedded digits teacher and print a quality table")
    q.add_argument("--method", default="cd", help="method name, or 'all'")
    q.add_argument("--teacher", choices=["vp", "flow"], default="vp",
                   help="the embedded digits teacher: vp (v-prediction DDPM) or flow (flow matching); on flow, "
                        "methods without flow-teacher support are skipped with the reason")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--num-samples", type=int, default=1000, help="samples per FID row")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("overrides", nargs="*", help="key=value overrides applied to every method's config")
    q.set_defaults(func=cmd_quickstart)

    s = sub.add_parser("sample", help="write a PNG grid from a pipeline directory")
    s.add_argument("pipeline", help="pipeline directory (e.g. runs/quickstart/cd/student)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's own)")
    s.add_argument("--num", type=int, default=16)
    s.add_argument("--out", default=None, help="PNG path (default: <pipeline>/grid-<steps>step.png)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=None, help="guidance scale")
    s.add_argument("--classes", type=int, nargs="*", default=None, help="class labels (class-conditional pipelines)")
    s.add_argument("--prompt", action="append", default=None, help="prompt (text-to-image pipelines); repeatable")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("export", help="export a run's student as a pipeline directory")
    e.add_argument("run_dir", help="a training output_dir (holds config.yaml and checkpoints/)")
    e.add_argument("--steps", type=int, default=None, help="scheduler default step count")
    e.add_argument("--weights", default=None, help="'student' or 'ema_<decay>' (default: the run's export_weights)")
    e.add_argument("--out", default=None, help="destination (default: <run_dir>/student)")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("reflow-pairs", help="write (noise, teacher ODE sample) pairs for reflow, resumably",
                       description="Solve the teacher's probability-flow ODE from fresh noise and write the pairs as "
                                   "sharded safetensors with a manifest (see the README's reflow pair format). "
                                   "Rerunning the same command resumes; under `accelerate launch` each process "
                                   "writes its share of the shards.")
    r.add_argument("teacher", help="teacher pipeline directory or hub id")
    r.add_argument("--num", type=int, required=True, help="number of pairs")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--steps", type=int, default=50, help="ODE steps (default 50)")
    r.add_argument("--solver", default="ddim", choices=["ddim", "euler", "heun"], help="ODE solver (ddim = euler)")
    r.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")
    r.add_argument("--batch-size", type=int, default=250, help="pairs solved together")
    r.add_argument("--prompts", default=None, help="text teachers: prompt file, one a line")
    r.set_defaults(func=cmd_reflow_pairs)

    try:
        from .eval import cli as eval_cli
    except ImportError:
        eval_cli = None
    if eval_cli is not None:
        eval_cli.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except StepdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
