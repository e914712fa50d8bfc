"""A toy two-network distiller, written against the Distiller interface alone (no change outside the tests).

A generator maps noise to images; a critic scores images. The generator's loss goes through the critic (so a
trainer that let it reach the critic would move the critic), and the critic updates every step while the
generator updates every fifth, like DMD2's two time-scale rule. Each loss call records what it saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from stepdistill.config import RunConfig, option
from stepdistill.distillers.base import Distiller, DistillerConfig
from stepdistill.teacher import Teacher, load_teacher
from stepdistill.training.trainer import Trainer


@dataclass
class ToyConfig(DistillerConfig):
    generator_every: int = option(5, "generator updates every this many steps")


class ToyDistiller(Distiller):
    name = "toy"
    config_class = ToyConfig
    hidden = True

    def __init__(self, teacher, config: ToyConfig):
        super().__init__(teacher, config)
        torch.manual_seed(0)
        c = teacher.sample_shape[0]
        self.generator = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, c, 3, padding=1))
        self.critic = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.LazyLinear(1))
        with torch.no_grad():
            self.critic(torch.zeros(1, *teacher.sample_shape))  # materialise the lazy layer
        self.seen = []  # (step, network, grads already present, other network requires grad, shared draw)

    def trainable_networks(self):
        return {"generator": self.generator, "critic": self.critic}

    def exported_networks(self):
        return {"generator": self.generator}

    def update_plan(self, step):
        return ["critic"] + (["generator"] if step % self.config.generator_every == 0 else [])

    def loss(self, batch, step, network):
        x = batch["pixel_values"].to(self.device)
        other = self.critic if network == "generator" else self.generator
        stale = any(p.grad is not None for net in (self.generator, self.critic) for p in net.parameters())
        shared = float(torch.rand(1, generator=self.shared_generator(step)))
        self.seen.append((step, network, stale, any(p.requires_grad for p in other.parameters()), shared))
        fake = self.generator(torch.randn_like(x))
        if network == "generator":
            return {"loss": -self.critic(fake).mean(), "fake_mean": fake.mean()}
        return {"loss": (self.critic(fake.detach()) - self.critic(x) + 1).pow(2).mean()}


class NoiseImages(Dataset):
    has_images = True

    def __init__(self, shape, n=64):
        self.images = torch.randn((n, *shape), generator=torch.Generator().manual_seed(1)).clamp(-1, 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i]}


def toy_trainer(teacher_dir, output_dir, *overrides) -> Trainer:
    """A Trainer over the toy distiller (on a teacher folder or a loaded Teacher), configured by key=value overrides
    of a RunConfig."""
    from stepdistill.config import apply_overrides, from_dict

    data = apply_overrides({"output_dir": str(output_dir)}, ["train.progress_bar=false", "train.report_to=none",
                                                             "train.batch_size=4", *overrides])
    distill = data.pop("distill", {})
    cfg = from_dict(RunConfig, data)
    cfg.distill = from_dict(ToyConfig, distill, "distill")
    teacher = teacher_dir if isinstance(teacher_dir, Teacher) else load_teacher(str(teacher_dir))
    return Trainer(ToyDistiller(teacher, cfg.distill), NoiseImages(teacher.sample_shape), cfg)
