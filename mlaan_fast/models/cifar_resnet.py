"""CIFAR ResNets (He et al. 2016, Sec. 4.2): 3x3 stem, three stages of BasicBlocks 16/32/64 wide."""
from __future__ import annotations

from torch import nn

from mlaan_fast.models.backbone import ResNet
from mlaan_fast.models.blocks import BasicBlock, conv3x3, init_weights

CIFAR_WIDTHS = (16, 32, 64)


def cifar_resnet(blocks_per_stage: int, num_classes: int = 10) -> ResNet:
    """ResNet-(6n+2) for 32x32 images: n = 3, 5, 9, 18 give ResNet-20, 32, 56, 110."""
    stem = nn.Sequential(conv3x3(3, CIFAR_WIDTHS[0]), nn.BatchNorm2d(CIFAR_WIDTHS[0]), nn.ReLU(inplace=True))
    stages, in_channels = [], CIFAR_WIDTHS[0]
    for i, width in enumerate(CIFAR_WIDTHS):
        stage = []
        for b in range(blocks_per_stage):
            stage.append(BasicBlock(in_channels, width, stride=2 if (i > 0 and b == 0) else 1))
            in_channels = width
        stages.append(stage)
    model = ResNet(stem, stages, in_channels, num_classes)
    init_weights(model)
    return model
