"""ImageNet ResNets with torchvision's layout (7x7 stem + max-pool, stages 64/128/256/512 wide)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mlaan_fast.models.backbone import ResNet
from mlaan_fast.models.blocks import BasicBlock, Bottleneck, init_weights

IMAGENET_WIDTHS = (64, 128, 256, 512)


def imagenet_resnet(block: type[BasicBlock | Bottleneck], layers: Sequence[int],
                    num_classes: int = 1000) -> ResNet:
    """ResNet-18/34 (BasicBlock [2,2,2,2]/[3,4,6,3]), -50/101/152 (Bottleneck [3,4,6|23|36,3]);
    stride on the 3x3."""
    stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
    stages, in_channels = [], 64
    for i, (width, n) in enumerate(zip(IMAGENET_WIDTHS, layers)):
        stage = []
        for b in range(n):
            stage.append(block(in_channels, width, stride=2 if (i > 0 and b == 0) else 1))
            in_channels = width * block.expansion
        stages.append(stage)
    model = ResNet(stem, stages, in_channels, num_classes)
    init_weights(model)
    return model
