"""InfoPro auxiliary head: a classifier (CE) and an image decoder (BCE on the de-normalised input)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlaan_fast.ops import aux_head_loss


def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 (fp64 stays fp64, for exact gradient tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class InfoProAuxHead(nn.Module):
    """Loss ``ixx * BCE(decoder(features), image) + ixy * CE(classifier(features), target)``.

    Classifier: conv3x3 (stride 2 and twice as wide unless ``in_channels >= final_channels``) -> BN ->
    ReLU -> GAP -> Linear(hidden) -> ReLU -> Linear(classes) -> CE (the last Linear + CE fused).
    Decoder: bilinear upsample to the image size -> conv3x3 -> BN -> ReLU -> conv3x3 to the image
    channels -> sigmoid, BCE against ``image * std + mean`` (the de-normalised input, in [0, 1]).
    """

    def __init__(self, in_channels: int, num_classes: int, *, image_mean: Sequence[float],
                 image_std: Sequence[float], ixx: float, ixy: float, final_channels: int = 64,
                 hidden: int = 128, decoder_channels: int = 12, fused: bool = True):
        super().__init__()
        if len(image_mean) != len(image_std):
            raise ValueError(f"image_mean has {len(image_mean)} channels but image_std has {len(image_std)}")
        stride = 1 if in_channels >= final_channels else 2
        width = in_channels if stride == 1 else 2 * in_channels
        self.classifier = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True))
        self.hidden = nn.Linear(width, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        image_channels = len(image_mean)
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(inplace=True), nn.Conv2d(decoder_channels, image_channels, 3, padding=1))
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, -1, 1, 1), persistent=False)
        self.ixx, self.ixy, self.fused = float(ixx), float(ixy), fused
        # None follows mlaan_fast.ops.target_checks; False: labels validated on the host (fused CE).
        self.check_target = None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: torch.Tensor, target: torch.Tensor, image: torch.Tensor):
        """features [B,C,h,w], target int64 [B], normalised image [B,3,H,W] -> weighted loss (0-dim)."""
        pooled = self.classifier(features).mean(dim=(2, 3))
        hidden = F.relu(self.hidden(pooled))
        if self.fused:
            ce = aux_head_loss(hidden, self.fc.weight, self.fc.bias, target, check_target=self.check_target)
        else:
            ce = F.cross_entropy(_fp32_or_wider(self.fc(hidden)), target)
        upsampled = F.interpolate(features, size=image.shape[-2:], mode="bilinear", align_corners=True)
        reconstruction_logits = self.decoder(upsampled)
        pixels = (image * self.image_std.to(image.dtype) + self.image_mean.to(image.dtype)).clamp(0, 1)
        # BCE(sigmoid(r), p) written on the logits: the same value, without log(0).
        bce = F.binary_cross_entropy_with_logits(_fp32_or_wider(reconstruction_logits),
                                                 _fp32_or_wider(pixels))
        return self.ixx * bce + self.ixy * ce
