"""Train the digits classifier whose penultimate features are the FID space of the digits world.

    python scripts/train_classifier.py      # writes samples/digits-classifier (about a minute)

Trained on 80% of the digits with small shifts and noise, so that generated digits that are
slightly off-centre or noisy still map near real ones; prints held-out accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdistill.eval.features import DigitsClassifier  # noqa: E402
from stepdistill.training.data import digits_images  # noqa: E402


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "samples/digits-classifier"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = digits_images()
    perm = torch.randperm(len(x), generator=g)
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * (n_train // 64 + 1))
    for epoch in range(args.epochs):
        model.train()
        order = tr[torch.randperm(n_train, generator=g)]
        for i in range(0, n_train, 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    model.save(args.out)
    print(f"classifier written to {args.out}")


if __name__ == "__main__":
    main()
