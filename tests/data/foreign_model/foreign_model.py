"""A "new model trained elsewhere", for the own-gallery tests: the pipeline knows nothing of
this class. It scores an image against one template per class (a full-size convolution) and
projects the scores linearly to a 12-d embedding with fixed weights. For the crash tests:
SLOW_MODEL_DELAY (seconds) makes each forward pass sleep, after touching the file named by
SLOW_MODEL_MARKER, so a test knows when inference runs and can kill the job then;
SLOW_MODEL_HOLD (a file name) makes each forward pass wait while that file exists, so a test can
act while a batch is in the middle of its inference and then let it go on."""
import os
import time

import torch
from torch import nn


class TemplateNet(nn.Module):
    def __init__(self, templates: torch.Tensor, out_dim: int = 12, seed: int = 0):
        super().__init__()
        k, h, w = templates.shape
        self.match = nn.Conv2d(1, k, (h, w), bias=False)
        self.project = nn.Linear(k, out_dim, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            t = templates - templates.mean(dim=(1, 2), keepdim=True)
            self.match.weight.copy_((t / t.flatten(1).norm(dim=1)[:, None, None])[:, None])
            self.project.weight.copy_(torch.randn(out_dim, k, generator=gen))
        self.embedding_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        marker = os.environ.get("SLOW_MODEL_MARKER")
        if marker:
            open(marker, "a").close()
        delay = float(os.environ.get("SLOW_MODEL_DELAY", "0") or 0)
        if delay:
            time.sleep(delay)
        hold = os.environ.get("SLOW_MODEL_HOLD")
        while hold and os.path.exists(hold):
            time.sleep(0.05)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        return self.project(self.match(x).flatten(1))


def make_templates(n_classes: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n_classes, size, size, generator=gen) > 0.5).float()


def factory() -> nn.Module:
    """Entry point form (`foreign_model:factory`): the same network, deterministic."""
    return TemplateNet(make_templates()).eval()
