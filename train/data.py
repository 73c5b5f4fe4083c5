"""Datasets, transforms and resumable samplers.

Determinism: the training sampler draws a permutation from (seed, epoch) and hands every sample a seed of its
own, derived from (seed, epoch, index).  The dataset runs each sample's random augmentation under that seed,
so augmentation does not depend on the number of workers, on which worker ran it, or on whether the epoch was
started fresh or resumed in the middle (the sampler simply starts at a later position).
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """Bad training/validation input (missing/empty folder, unreadable image)."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % (2 ** 63 - 1)


class _IsolatedRNG:
    """Seed python/numpy/torch-CPU RNGs for one sample, restoring the caller's states afterwards (matters
    when the loader runs in the main process: the training RNG stream must not see the data pipeline)."""

    def __init__(self, s: int):
        self.s = s

    def __enter__(self):
        self._py = random.getstate()
        self._np = np.random.get_state()
        self._t = torch.random.default_generator.get_state()
        random.seed(self.s)
        np.random.seed(self.s % (2 ** 32))
        torch.random.default_generator.manual_seed(self.s)

    def __exit__(self, *exc):
        random.setstate(self._py)
        np.random.set_state(self._np)
        torch.random.default_generator.set_state(self._t)
        return False


class SeededDataset(Dataset):
    """Wraps a dataset whose ``load(i)`` returns (image, target); items are (image, target, n_bad_skipped).

    Keys are (index, seed) pairs from the samplers below.  With ``skip_bad`` an unreadable file is
    replaced by the next readable one and counted; otherwise a DataError naming the file is raised.
    """

    def __init__(self, base, transform: Callable | None, skip_bad: bool = False):
        self.base, self.transform, self.skip_bad = base, transform, skip_bad

    def __len__(self):
        return len(self.base)

    def _path(self, i):
        base = self.base
        if isinstance(base, torch.utils.data.Subset):
            base, i = base.dataset, base.indices[i]
        samples = getattr(base, "samples", None)
        return samples[i][0] if samples is not None else f"sample {i}"

    def __getitem__(self, key):
        index, s = key if isinstance(key, tuple) else (key, 0)
        bad = 0
        for attempt in range(min(len(self.base), 50)):
            i = (index + attempt) % len(self.base)
            try:
                img, target = self.base[i]
            except Exception as e:  # noqa: BLE001 - any decode failure is reported with the path
                if not self.skip_bad:
                    raise DataError(f"cannot read image {self._path(i)}: {type(e).__name__}: {e} "
                                    "(fix or remove the file, or pass --bad-images skip)") from e
                warnings.warn(f"skipping unreadable image {self._path(i)}: {e}")
                bad += 1
                continue
            if self.transform is not None:
                with _IsolatedRNG(s):
                    img = self.transform(img)
            return img, target, bad
        raise DataError(f"no readable image found near index {index} (50 consecutive failures)")


class TrainSampler(Sampler):
    """Distributed, resumable, deterministic training sampler yielding (index, sample_seed).

    Every rank gets ``len(dataset) // world`` samples per epoch (the shuffled tail is dropped so ranks stay in
    step).  ``set_epoch`` must be called before each epoch; ``set_start`` skips already-trained samples.
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.n, self.world, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.num_samples = n // num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _mine(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world
        return order[self.rank:total:self.world]

    def __iter__(self):
        mine = self._mine()
        for pos in range(self.start, self.num_samples):
            yield mine[pos], sample_seed(self.seed, self.epoch, mine[pos])

    def __len__(self):
        return max(0, self.num_samples - self.start)


class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r+world, ... (no padding, so counts sum exactly)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.idx = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter((i, 0) for i in self.idx)

    def __len__(self):
        return len(self.idx)


# ----------------------------------------------------------------------------------------------- folders
def _check_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{what} folder not found: {path} (expected an ImageNet layout: <root>/train/<class>/*.jpg "
                        "and <root>/val/<class>/*.jpg)")
    classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not classes:
        raise DataError(f"{what} folder {path} has no class sub-folders")
    for c in classes:
        for _, _, files in os.walk(os.path.join(path, c)):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return
    raise DataError(f"{what} folder {path} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")


def image_folder(path: str, what: str):
    from torchvision.datasets import ImageFolder

    _check_folder(path, what)
    return ImageFolder(path, allow_empty=True)


def find_split(root: str, split: str) -> str:
    """<root>/<split> when it exists, else root itself when it directly holds class folders (eval convenience)."""
    p = os.path.join(root, split)
    return p if os.path.isdir(p) else root


def train_transform(cfg: dict[str, Any]):
    from timm.data import create_transform

    aa = cfg["auto_augment"]
    return create_transform(
        input_size=cfg["img_size"], is_training=True, color_jitter=cfg["color_jitter"] or None,
        auto_augment=None if aa in (None, "", "none") else aa, interpolation=cfg["interpolation"],
        re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
        mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(img_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic"):
    """Official eval transform: resize shorter side to img_size/crop_pct (256 for 224), centre crop, normalise."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([
        T.Resize(int(img_size / crop_pct), interpolation=interp),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ----------------------------------------------------------------------------------------------- digits demo
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


class TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.classes = [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def digits_splits(img_size: int = 32, val_fraction: float = 0.2):
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), upsampled to img_size RGB in
    [-1, 1], split by a fixed permutation (seed 0, independent of --seed): 1438 train / 359 val."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise DataError("the demo needs scikit-learn (pip install 'groupmamba[demo]')") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator()
    g.manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    n_val = int(round(len(y) * val_fraction))
    va, tr = perm[:n_val], perm[n_val:]
    return TensorImages(x[tr], y[tr]), TensorImages(x[va], y[va])


def digits_train_aug(img_size: int, pad: int = 2):
    """Random shift by up to ``pad`` pixels (background-filled), applied to a CHW tensor."""
    bg = (0.0 - DIGITS_MEAN) / DIGITS_STD

    def aug(x: torch.Tensor) -> torch.Tensor:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=bg)
        i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return xp[:, i:i + img_size, j:j + img_size]

    return aug


# ----------------------------------------------------------------------------------------------- builders
def _limit(ds, n: int):
    if not n or n >= len(ds):
        return ds
    idx = torch.linspace(0, len(ds) - 1, n).round().long().unique().tolist()
    return torch.utils.data.Subset(ds, idx)


def build_datasets(cfg: dict[str, Any]):
    """(train, val, num_classes) as SeededDatasets."""
    skip = cfg["bad_images"] == "skip"
    lt, lv = cfg.get("limit_train", 0), cfg.get("limit_val", 0)
    if cfg["demo"]:
        tr, va = digits_splits(cfg["img_size"])
        aug = digits_train_aug(cfg["img_size"]) if cfg["demo_aug"] else None
        return SeededDataset(_limit(tr, lt), aug), SeededDataset(_limit(va, lv), None), len(tr.classes)
    root = cfg["data"]
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    tr = image_folder(os.path.join(root, "train"), "training")
    va = image_folder(os.path.join(root, "val"), "validation")
    if tr.classes != va.classes:
        extra = sorted(set(va.classes) - set(tr.classes))
        if extra:
            raise DataError(f"validation classes missing from training: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        warnings.warn(f"val has {len(va.classes)} of the {len(tr.classes)} training classes; labels follow train")
        va.samples = [(p, tr.class_to_idx[va.classes[t]]) for p, t in va.samples]
        va.imgs, va.targets = va.samples, [t for _, t in va.samples]
        va.classes, va.class_to_idx = tr.classes, tr.class_to_idx
    return (SeededDataset(_limit(tr, lt), train_transform(cfg), skip),
            SeededDataset(_limit(va, lv), eval_transform(cfg["img_size"], cfg["crop_pct"], cfg["interpolation"]), skip),
            len(tr.classes))


def make_loader(ds, sampler, batch_size: int, workers: int, pin: bool, drop_last: bool, seed: int = 0):
    g = torch.Generator()  # own generator: creating iterators must not consume the global torch RNG
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      drop_last=drop_last, persistent_workers=workers > 0, generator=g,
                      prefetch_factor=4 if workers > 0 else None)
