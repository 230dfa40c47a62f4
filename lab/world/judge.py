"""The judge: a small CNN that reads every factor of a world image (the stand-in for the GPT-4o judge).

Trained on rendered images with mild blur and noise, so that it also reads generated images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .factors import FACTORS, Assignment

FACTOR_NAMES = list(FACTORS)


class FactorJudge(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({f: nn.Linear(64 * 16, len(v)) for f, v in FACTORS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] in [0,1] → logits per factor."""
        x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False) if images.shape[-1] != 32 else images
        h = self.features(x * 2 - 1)
        return {f: head(h) for f, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        logits = self.eval()(images.to(next(self.parameters()).device))
        picks = {f: logits[f].argmax(-1).tolist() for f in FACTORS}
        return [{f: FACTORS[f][picks[f][i]] for f in FACTORS} for i in range(images.shape[0])]


def labels(assignments: list[Assignment]) -> dict[str, torch.Tensor]:
    return {f: torch.tensor([FACTORS[f].index(a[f]) for a in assignments]) for f in FACTORS}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    noisy = images * (1 - amount) + blur * amount + 0.04 * torch.randn(images.shape, generator=generator)
    return noisy.clamp(0, 1)


def train_judge(images: torch.Tensor, assignments: list[Assignment], epochs: int = 6, seed: int = 0,
                batch_size: int = 64, device: str | torch.device = "cpu") -> FactorJudge:
    """The judge trained on ``device`` (batches and augmentation drawn on the host, so every device sees the
    same ones), returned on the CPU."""
    torch.manual_seed(seed)
    judge = FactorJudge().to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    target = {f: t.to(device) for f, t in labels(assignments).items()}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            logits = judge.train()(augment(images[index], generator).to(device))
            loss = sum(F.cross_entropy(logits[f], target[f][index.to(device)]) for f in FACTORS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.cpu().eval()


def accuracy(judge: FactorJudge, images: torch.Tensor, assignments: list[Assignment]) -> dict[str, float]:
    predicted = judge.predict(images)
    return {f: sum(p[f] == a[f] for p, a in zip(predicted, assignments)) / len(assignments) for f in FACTORS}


def save_judge(judge: FactorJudge, path: str | Path) -> None:
    from omni_attribute.files import atomic_save_safetensors

    atomic_save_safetensors(judge.state_dict(), path, {"omni_attribute_world": "factor-judge-v1"})


def load_judge(path: str | Path) -> FactorJudge:
    from safetensors.torch import load_file

    judge = FactorJudge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()
