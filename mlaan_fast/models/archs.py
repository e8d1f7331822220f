"""The backbones by name: CIFAR ResNet-20/32/56/110 and ImageNet ResNet-18/34/50/101/152."""
from __future__ import annotations

from dataclasses import dataclass

from mlaan_fast.models.backbone import ResNet
from mlaan_fast.models.blocks import BasicBlock, Bottleneck
from mlaan_fast.models.cifar_resnet import cifar_resnet
from mlaan_fast.models.imagenet_resnet import imagenet_resnet


@dataclass(frozen=True)
class Arch:
    family: str  # "cifar" (32x32 stem) or "imagenet" (7x7 stem + max-pool)
    block: type
    layers: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)


ARCHS: dict[str, Arch] = {
    "resnet20": Arch("cifar", BasicBlock, (3, 3, 3)),
    "resnet32": Arch("cifar", BasicBlock, (5, 5, 5)),
    "resnet56": Arch("cifar", BasicBlock, (9, 9, 9)),
    "resnet110": Arch("cifar", BasicBlock, (18, 18, 18)),
    "resnet18": Arch("imagenet", BasicBlock, (2, 2, 2, 2)),
    "resnet34": Arch("imagenet", BasicBlock, (3, 4, 6, 3)),
    "resnet50": Arch("imagenet", Bottleneck, (3, 4, 6, 3)),
    "resnet101": Arch("imagenet", Bottleneck, (3, 4, 23, 3)),
    "resnet152": Arch("imagenet", Bottleneck, (3, 8, 36, 3)),
}


def get_arch(arch: str) -> Arch:
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def build_backbone(arch: str, num_classes: int = 10) -> ResNet:
    """The plain (end-to-end) network of that name, freshly initialised."""
    spec = get_arch(arch)
    if spec.family == "cifar":
        return cifar_resnet(spec.layers[0], num_classes)
    return imagenet_resnet(spec.block, spec.layers, num_classes)
