"""The small CNN that `cdm train-features` trains; its penultimate layer is the space `fd_<dataset>` is measured in."""

from __future__ import annotations

import torch
from torch import nn

from pipelines.errors import UserError


class FeatureClassifier(nn.Module):
    """Two conv stages (conv→ReLU→2×2 max-pool), a hidden layer of `feature_dim` units, a linear head (LeNet-like).

    Small on purpose: a few epochs on MNIST-sized digits reach ~97% test
    accuracy within a minute on two CPU cores, and the features only need to
    tell the dataset's classes apart well.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, width_mult: int = 16,
                 feature_dim: int = 128):
        super().__init__()
        self.config = {"in_channels": in_channels, "height": height, "width": width, "num_classes": num_classes,
                       "width_mult": width_mult, "feature_dim": feature_dim}
        c1, c2 = width_mult, 2 * width_mult
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * (height // 4) * (width // 4)
        if flat == 0:
            raise UserError(f"images of {height}×{width} are too small for the feature classifier (need ≥ 4×4)")
        self.hidden = nn.Sequential(nn.Linear(flat, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
