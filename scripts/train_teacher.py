"""Train an embedded digits teacher: a class-conditional v-prediction DDPM (vp) or flow-matching model (flow).

    python scripts/train_teacher.py                      # writes samples/digits-teacher
    python scripts/train_teacher.py --kind flow          # writes samples/digits-flow-teacher
    python scripts/train_teacher.py train.max_steps=50   # key=value overrides of the config

The network is a small UNet2DConditionModel (no cross-attention; one self-attention block at
8x8) with 11 class embeddings, index 10 being the null class that label dropout trains, so
classifier-free guidance works. squaredcos_cap_v2 with v-prediction keeps x0 well-posed at the
top of the schedule (see METHODS.md, pitfall 9). The flow teacher is the same network trained on
the velocity eps - x0 at uniform t (training_configs/digits/teacher_flow.yaml); its scheduler is
FlowMatchEulerDiscreteScheduler with FLOW_SHIFT, which only moves the sampling grid (the training
times do not depend on it). FLOW_SHIFT = 2 is provisional, between SD3's 3 and the unshifted 1 for this
small image; benchmarks/flow_teacher_shift.py measures Euler FID per shift on the trained teacher, and the
scheduler config's shift can be set to the winner afterwards without retraining.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.config import load_config  # noqa: E402
from stepdistill.pipelines import ClassConditionalPipeline  # noqa: E402
from stepdistill.runner import run, student_dir  # noqa: E402
from stepdistill.training.data import DIGITS_CLASSES, DIGITS_SIZE  # noqa: E402


def digits_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=DIGITS_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", num_class_embeds=DIGITS_CLASSES + 1)


FLOW_SHIFT = 2.0
KINDS = {"vp": ("teacher.yaml", "samples/digits-teacher"), "flow": ("teacher_flow.yaml", "samples/digits-flow-teacher")}


def initial_pipeline(seed: int, kind: str = "vp", shift: float = FLOW_SHIFT) -> ClassConditionalPipeline:
    torch.manual_seed(seed)
    if kind == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=True)
    return ClassConditionalPipeline(unet=digits_unet(), scheduler=scheduler, null_class=DIGITS_CLASSES,
                                    num_classes=DIGITS_CLASSES, default_steps=50)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), default="vp", help="vp: v-prediction DDPM; flow: flow matching")
    parser.add_argument("--shift", type=float, default=FLOW_SHIFT, help="the flow teacher's scheduler shift")
    parser.add_argument("--config", help="default: training_configs/digits/teacher.yaml or teacher_flow.yaml")
    parser.add_argument("--out", help="default: samples/digits-teacher or samples/digits-flow-teacher")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    config_name, out_name = KINDS[args.kind]
    args.config = args.config or str(ROOT / "training_configs/digits" / config_name)
    args.out = args.out or str(ROOT / out_name)
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "init"
        cfg = load_config(args.config, [*args.overrides, f"teacher={init_dir}"])
        initial_pipeline(cfg.seed, args.kind, args.shift).save_pretrained(init_dir)
        run(cfg)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(student_dir(cfg), out)
    shutil.copy(Path(cfg.output_dir) / "samples" / f"student-{cfg.export.steps[0]}step.png", out / "samples.png")
    print(f"teacher written to {out}")


if __name__ == "__main__":
    main()
