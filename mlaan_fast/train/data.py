"""Datasets, the paper's augmentations, and loaders whose order and augmentation are a pure function
of (seed, epoch): a resumed run sees exactly the batches an uninterrupted run would have seen.

The training sampler yields ``(epoch_key, index)`` pairs; :class:`SeededAugment` seeds the random
transforms of each sample from that pair, so worker count and persistence do not change the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

_CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                "test_batch", "batches.meta"]
# torchvision's STL10 checks the unlabeled images too, even when it reads only the labelled splits
_STL_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]
_NEVER_DOWNLOADS = "(mlaan-fast never downloads; pass the folder with --data-dir)"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where --data-dir says; the message lists them and how to get them."""


class DatasetError(ValueError):
    """The dataset files are there but cannot be used (wrong contents, unreadable, inconsistent)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset: classes, input size, normalisation."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple


def _missing(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not p.exists()]


def _require(name: str, paths: list[Path], how: str) -> None:
    missing = _missing(paths)
    if missing:
        listing = ", ".join(str(p) for p in missing)
        raise DatasetNotFoundError(f"{name}: expected these files, which are missing: {listing}; {how} "
                                   f"{_NEVER_DOWNLOADS}")


def _open(name: str, make, checksums: list[tuple[Path, str]], how: str):
    """``make()`` (a torchvision dataset), its failures told as DatasetError naming the damaged files
    (torchvision's own message advises downloading, which mlaan-fast never does)."""
    try:
        return make()
    except ImportError as exc:
        raise DatasetError(f"{name}: reading its files needs the module {exc.name!r} (pip install "
                           f"{exc.name})") from None
    except Exception as exc:
        from torchvision.datasets.utils import check_integrity

        bad = [str(p) for p, md5 in checksums if not check_integrity(str(p), md5)]
        if bad:
            raise DatasetError(f"{name}: these files have the expected names but not the expected contents "
                               f"(MD5 differs): {', '.join(bad)}; replace them with a fresh copy. {how}"
                               ) from None
        reason = str(exc).split("You can use download=True")[0].strip().splitlines()
        raise DatasetError(f"{name}: the files are present but cannot be read ({type(exc).__name__}: "
                           f"{reason[0] if reason else ''}); replace them with a fresh copy. {how}") from None


def _cifar10(root: Path, train: bool):
    import torchvision

    folder = root / "cifar-10-batches-py"
    how = (f"Get them with: mkdir -p {root} && curl -L "
           f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz | tar xz -C {root}")
    _require("cifar10", [folder / f for f in _CIFAR_FILES], how)
    sums = [(folder / f, md5) for f, md5 in torchvision.datasets.CIFAR10.train_list
            + torchvision.datasets.CIFAR10.test_list]
    meta = torchvision.datasets.CIFAR10.meta
    sums.append((folder / meta["filename"], meta["md5"]))
    return _open("cifar10", partial(torchvision.datasets.CIFAR10, str(root), train=train, download=False),
                 sums, how)


def _svhn(root: Path, train: bool):
    import torchvision

    split = "train" if train else "test"
    how = (f"Get them with: curl -L -o {root}/train_32x32.mat http://ufldl.stanford.edu/housenumbers/"
           f"train_32x32.mat (and test_32x32.mat likewise); reading them needs scipy")
    _require("svhn", [root / "train_32x32.mat", root / "test_32x32.mat"], how)
    _, filename, md5 = torchvision.datasets.SVHN.split_list[split]
    return _open("svhn", partial(torchvision.datasets.SVHN, str(root), split=split, download=False),
                 [(root / filename, md5)], how)


def _stl10(root: Path, train: bool):
    import torchvision

    folder = root / "stl10_binary"
    how = (f"Get them with: mkdir -p {root} && curl -L "
           f"http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz | tar xz -C {root}")
    _require("stl10", [folder / f for f in _STL_FILES], how)
    sums = [(folder / f, md5) for f, md5 in torchvision.datasets.STL10.train_list
            + torchvision.datasets.STL10.test_list]
    split = "train" if train else "test"
    return _open("stl10", partial(torchvision.datasets.STL10, str(root), split=split, download=False), sums,
                 how)


_IMAGENET_HOW = ("Expected ImageFolder layout: DATA_DIR/train/<class>/*.JPEG and DATA_DIR/val/<class>/*.JPEG "
                 "(ILSVRC-2012 from https://image-net.org, validation images sorted into class folders)")


def _imagenet(root: Path, train: bool):
    import torchvision

    folder = root / ("train" if train else "val")
    _require("imagenet", [root / "train", root / "val"], _IMAGENET_HOW)
    try:
        return torchvision.datasets.ImageFolder(str(folder), loader=_read_image)
    except OSError as exc:
        raise DatasetError(f"imagenet: {folder}: {str(exc).splitlines()[0]} {_IMAGENET_HOW}") from None


def _read_image(path: str):
    """An RGB PIL image; DatasetError naming the file if it is not a readable image."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"imagenet: cannot read the image {path} ({type(exc).__name__}); replace or "
                           "remove it") from None


class TensorImages(Dataset):
    """Images held in memory as a float tensor [N, 3, H, W] in [0, 1] with int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.targets = images, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


def _digits(train: bool, image_size: int = 32, test_fraction: float = 0.25) -> TensorImages:
    """scikit-learn's 8x8 digits (1797 images, offline), bilinear-upsampled to 3x32x32; fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                        align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    # the split is fixed, independent of --seed
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = int(round(len(y) * test_fraction))
    idx = perm[n_test:] if train else perm[:n_test]
    return TensorImages(x[idx], y[idx])


def _synthetic(train: bool, n_train: int = 256, n_test: int = 64, num_classes: int = 10) -> TensorImages:
    """Learnable random data: a smooth template per class plus noise, 3x32x32, fixed by a private seed."""
    g = torch.Generator().manual_seed(4321)
    templates = torch.nn.functional.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=(32, 32),
                                                mode="bilinear", align_corners=False)
    n = n_train if train else n_test
    g.manual_seed(4321 + int(train))
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = (templates[y] + 0.25 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return TensorImages(x, y)


_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": DatasetInfo("svhn", 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": DatasetInfo("stl10", 10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": DatasetInfo("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": DatasetInfo("digits", 10, 32, (0.3051,) * 3, (0.3235,) * 3),
    "synthetic": DatasetInfo("synthetic", 10, 32, (0.5,) * 3, (0.3,) * 3),
}


def dataset_info(name: str) -> DatasetInfo:
    """Classes, image size and normalisation of a dataset by name."""
    if name not in _INFO:
        raise ValueError(f"dataset: unknown {name!r}; choose one of {', '.join(_INFO)}")
    return _INFO[name]


def _transforms(info: DatasetInfo, train: bool, from_tensor: bool):
    """The paper's augmentation + normalisation (method.md §5) for one split."""
    import torchvision.transforms as T

    steps = []
    if not from_tensor:
        steps.append(T.ToTensor())
    if info.name == "imagenet":
        if train:
            resize = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        else:
            resize = [T.Resize(256), T.CenterCrop(224)]
        return T.Compose(resize + steps + [T.Normalize(info.mean, info.std)])
    if train:
        steps += {
            "cifar10": [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()],
            "svhn": [T.RandomCrop(32, padding=2)],
            "stl10": [T.RandomCrop(96, padding=4), T.RandomHorizontalFlip()],
            "digits": [T.RandomCrop(32, padding=2)],  # digits are not mirror-symmetric: no flip
            "synthetic": [T.RandomHorizontalFlip()],
        }[info.name]
    return T.Compose(steps + [T.Normalize(info.mean, info.std)])


class SeededAugment(Dataset):
    """Applies ``transform`` to ``base[i]``; a key ``(epoch_key, i)`` seeds the transform's randomness."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch_key, i = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((epoch_key * 1_000_003 + i) % (2**63 - 1))
                image, label = self.base[i]
                return self.transform(image), label
        image, label = self.base[key]
        return self.transform(image), label


class EpochSampler(Sampler):
    """DistributedSampler order for (seed, epoch, rank), yielding ``(epoch_key, index)`` pairs."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.inner = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.inner.seed = state["seed"]
        self.set_epoch(state["epoch"])

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        key = self.seed * 100_003 + self.epoch
        return ((key, i) for i in self.inner)


def build_datasets(name: str, data_dir: str | Path, train_transform: bool = True):
    """(train set, test set, DatasetInfo), augmentations attached; raises DatasetNotFoundError if absent."""
    info = dataset_info(name)
    root = Path(data_dir).expanduser()
    if name in ("digits", "synthetic"):
        make = _digits if name == "digits" else _synthetic
        train, test = make(True), make(False)
        from_tensor = True
    else:
        if root.exists() and not root.is_dir():
            raise DatasetNotFoundError(f"data_dir: {root} is a file, not a folder; pass the folder that "
                                       f"holds the {name} files with --data-dir")
        make = {"cifar10": _cifar10, "svhn": _svhn, "stl10": _stl10, "imagenet": _imagenet}[name]
        train, test = make(root, True), make(root, False)
        from_tensor = False
        if name == "imagenet":
            _check_same_classes(root, train.classes, test.classes)
            info = DatasetInfo(info.name, len(train.classes), info.image_size, info.mean, info.std)
        train[0], test[0]  # reads one sample of each split now, not in the middle of an epoch
    train_set = SeededAugment(train, _transforms(info, train_transform, from_tensor))
    test_set = SeededAugment(test, _transforms(info, False, from_tensor))
    return train_set, test_set, info


def _check_same_classes(root: Path, train: list[str], test: list[str]) -> None:
    if train != test:
        only = sorted(set(train) ^ set(test))[:3]
        raise DatasetError(f"imagenet: {root}/train has {len(train)} class folders and {root}/val has "
                           f"{len(test)}, not the same ones (e.g. {', '.join(only)}); labels would not "
                           "match. Both must hold the same class folders")


class ShardSampler(Sampler):
    """Indices rank, rank+world, ... in order, without padding (exact evaluation across ranks)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))


def build_loaders(train_set, test_set, batch_size: int, seed: int, workers: int, rank: int = 0,
                  world: int = 1, pin_memory: bool = False, drop_last: bool = False):
    """(train loader, its EpochSampler, test loader); ``batch_size`` is global, split over ``world`` ranks;
    ``drop_last``: the training loader leaves out a last batch smaller than the others."""
    if batch_size % world:
        raise ValueError(f"batch_size: {batch_size} is not divisible by the {world} data-parallel ranks")
    per_rank = batch_size // world
    sampler = EpochSampler(len(train_set), seed, rank, world)
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=pin_memory and workers > 0)
    train = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=drop_last, **common)
    test_sampler = ShardSampler(len(test_set), rank, world)
    test = DataLoader(test_set, batch_size=per_rank, sampler=test_sampler, **common)
    return train, sampler, test


def steps_per_epoch(loader: DataLoader, max_steps: int | None) -> int:
    """Batches trained per epoch: the loader's length, capped by ``max_steps`` if given."""
    n = len(loader)
    return min(n, max_steps) if max_steps else n


def check_labels(targets: torch.Tensor, num_classes: int, where: str) -> None:
    """Raise ValueError if a label lies outside [0, num_classes)."""
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        bad = targets[(targets < 0) | (targets >= num_classes)][:5].tolist()
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}); found {bad} "
                         f"(min {lo}, max {hi}). Check --dataset and the data in --data-dir.")


