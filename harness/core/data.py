"""Data: IDX files, the four sources and a factory's, the validation split and the per-rank batch plan.

Owns reading and checking data files, turning each source into in-memory tensors
(train / validation / test) and deciding which sample indices each rank trains on
at each step. Does not own models, devices or training.

Batches are slices of one seeded permutation per epoch; no DataLoader is involved. The samples live on
the training device when they fit there (``data.resident``); otherwise the features stay in host memory
(pinned for a GPU) and each batch is gathered there and copied over as it is drawn, by the same batch
plan: the same samples in the same order wherever they live.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from harness.core.config import (KNOWN_SPLIT_SIZES, Config, DataConfig, check_divisible_by_world_size,
                            steps_per_epoch)
from harness.core.factories import factory_data
from harness.errors import InputError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = {
    "fashion-mnist": "install them with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_FASHION_MNIST_DIR}) or put the four IDX files in data.data_dir or $HARNESS_DATA_DIR",
    "mnist": "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in data.data_dir "
    "or $HARNESS_DATA_DIR",
}
# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian.
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Read one IDX file (raw or .gz), checking magic number, dimensions and length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise InputError(f"{path}: corrupt gzip stream ({err})") from None
    if len(raw) < 4:
        raise InputError(f"{path}: truncated: {len(raw)} bytes, expected at least a 4-byte IDX header")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise InputError(f"{path}: wrong magic number 0x{raw[:4].hex()}; expected 0x0000TTNN "
                         "(IDX: two zero bytes, a type code, the number of dimensions)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise InputError(f"{path}: wrong number of dimensions {ndim}; expected {expect_ndim}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise InputError(f"{path}: truncated header: {len(raw)} bytes, expected {header_len}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise InputError(f"{path}: {what}: {len(raw)} bytes, expected {expected} for dimensions {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    return next((path for path in (directory / (stem + ".gz"), directory / stem) if path.exists()), None)


def locate_idx_dir(data: DataConfig, env_dir: Optional[str]) -> Path:
    """The folder of the four IDX files: data.data_dir, else $HARNESS_DATA_DIR, else Debian's copy.
    A location the user named is used or refused, never passed over for another copy."""
    if data.data_dir:
        directory, key = Path(data.data_dir), "data.data_dir"
    elif env_dir:
        directory, key = Path(env_dir), "$HARNESS_DATA_DIR"
    elif data.dataset == "fashion-mnist":
        directory, key = Path(DEBIAN_FASHION_MNIST_DIR), f"data.dataset {data.dataset!r}"
    else:
        raise InputError(f"data.dataset {data.dataset!r}: IDX files not found (no data.data_dir or "
                         f"$HARNESS_DATA_DIR set); " + HOW_TO_GET[data.dataset])
    missing = [stem for stem in IDX_FILES.values() if not _find_idx(directory, stem)]
    if missing:
        raise InputError(f"{key}: {directory} does not hold the {data.dataset} IDX files (missing "
                         f"{', '.join(missing)}[.gz]); " + HOW_TO_GET[data.dataset])
    return directory


def load_idx_split(directory: Path, part: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``part`` ("train" or "test") of an IDX data set: features as stored (pixel values 0..255, one
    row per image; ``load_dataset`` scales the rows it keeps), labels checked."""
    image_path = _find_idx(directory, IDX_FILES[f"{part}_images"])
    label_path = _find_idx(directory, IDX_FILES[f"{part}_labels"])
    x, y = read_idx(image_path, expect_ndim=3), read_idx(label_path, expect_ndim=1)
    if y.dtype.kind not in "iu":
        raise InputError(f"{label_path}: labels of type {y.dtype.name}; expected integer labels "
                         "(IDX type code 0x08, unsigned byte)")
    if len(y) == 0:
        raise InputError(f"{label_path}: holds zero samples; expected at least one")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{label_path}: {y.shape[0]} labels for {x.shape[0]} images in {image_path}; "
                         "expected one label per image")
    if x.shape[1:] != (28, 28):
        raise InputError(f"{image_path}: wrong image dimensions {x.shape[1:]}; expected (28, 28)")
    if y.min() < 0 or y.max() >= num_classes:
        raise InputError(f"{label_path}: label {int(y.max()) if y.max() >= num_classes else int(y.min())} "
                         f"out of range; expected 0..{num_classes - 1}")
    return x.reshape(len(x), -1), y


@dataclass(frozen=True)
class Split:
    """Features (float32 in [0, 1]) and integer targets held in memory.

    The targets live on the training device; the features there too, or in host memory when the data
    set does not fit on the device (``Dataset.place``): every batch and subset taken from a split comes
    back on the targets' device either way.
    """

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def device(self) -> torch.device:
        """Where batches of this split are computed on."""
        return self.targets.device

    def to(self, device) -> "Split":
        return Split(self.features.to(device), self.targets.to(device))

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start:stop`` on the split's device."""
        return self.features[start:stop].to(self.device, non_blocking=True), self.targets[start:stop]

    def head(self, count: int) -> "Split":
        """The first ``count`` samples."""
        return Split(self.features[:count].to(self.device), self.targets[:count])

    def spread(self, count: Optional[int]) -> "Split":
        """``count`` samples evenly spaced over the split (a fixed subsample that needs no seed); all of it
        for None or a count at least its length."""
        if count is None or count >= len(self):
            return self
        rows = torch.linspace(0, len(self) - 1, count, device=self.device).long()
        return Split(*self.batch(rows))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``indices`` (any shape, on the split's device): features [*indices.shape, ...] and
        targets [*indices.shape], both on the split's device. ``index_select`` copies whole rows: several
        times faster than ``features[indices]``; features in host memory are gathered there, then copied."""
        flat = indices.reshape(-1)
        features = self.features.index_select(0, flat.to(self.features.device))
        return (features.to(indices.device, non_blocking=True).view(*indices.shape, *self.features.shape[1:]),
                self.targets.index_select(0, flat).view(indices.shape))


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split
    test: Split

    def to(self, device) -> "Dataset":
        """All three splits moved to ``device`` once (training then indexes them there)."""
        return Dataset(self.train.to(device), self.validation.to(device), self.test.to(device))

    @property
    def feature_bytes(self) -> int:
        return sum(s.features.numel() * s.features.element_size() for s in (self.train, self.validation, self.test))

    def place(self, device, resident: str = "auto") -> "Dataset":
        """The splits for training on ``device``: all of it there when ``resident`` is "device", or "auto"
        and the features take at most half the device's free memory; otherwise the features stay in host
        memory (pinned, so copies to a GPU run asynchronously) and only the targets move."""
        device = torch.device(device)
        if features_stay_on_host(device, self.feature_bytes, resident):
            if device.type == "cuda":
                print(f"data: the samples' {self.feature_bytes / 2**30:.2f} GiB stay in host memory (data.resident "
                      f"{resident}); each batch is copied to {device} as it is drawn", flush=True)
            return Dataset(*(Split(_pinned(s.features, device), s.targets.to(device))
                             for s in (self.train, self.validation, self.test)))
        return self.to(device)


RESIDENT_SHARE = 0.5  # of the device's free memory the data set may take; the rest is the model's and batches'


def features_stay_on_host(device: torch.device, feature_bytes: int, resident: str,
                          free_bytes: Optional[int] = None) -> bool:
    """Whether ``data.resident`` keeps the features in host memory for training on ``device``, whose free
    memory is ``free_bytes`` (asked of the GPU when None)."""
    if device.type == "cpu" or resident == "device":
        return False
    if resident == "host":
        return True
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else feature_bytes
    return feature_bytes > RESIDENT_SHARE * free_bytes


def _pinned(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    features = features.cpu()
    return features.pin_memory() if device.type == "cuda" else features


def load_dataset(cfg: Config) -> Dataset:
    """Read the configured source and split it into train / validation / test."""
    data = cfg.data
    pixel_scale = None  # IDX files hold pixel values: scaled to [0, 1] once the kept rows are known
    if data.factory is not None:
        samples = factory_data(data.factory, data.kwargs)
        x_train, y_train, x_test, y_test = (samples.train_features, samples.train_labels, samples.test_features,
                                            samples.test_labels)
        if cfg.model.factory is None:  # the note's MLP takes each sample as one row of features
            x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    elif data.dataset in ("fashion-mnist", "mnist"):
        directory = locate_idx_dir(data, os.environ.get("HARNESS_DATA_DIR"))
        x_train, y_train = load_idx_split(directory, "train", cfg.num_classes)
        x_test, y_test = load_idx_split(directory, "test", cfg.num_classes)
        pixel_scale = 255.0
    elif data.dataset == "digits":
        x_train, y_train, x_test, y_test = _digits(cfg.seed)
    else:
        x_train, y_train, x_test, y_test = _synthetic(cfg)
    def as_split(x, y):
        if torch.is_tensor(x):
            return Split(x, y)
        return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))

    train_all, test = as_split(x_train, y_train), as_split(x_test, y_test)
    check_sample_counts(cfg, len(train_all))
    train, validation = split_validation(train_all, data.validation_size, seed=cfg.seed)
    if data.train_subset is not None:
        train = train.head(data.train_subset)
    if data.test_subset is not None:
        test = test.head(data.test_subset)
    if pixel_scale is not None:  # float32 / 255 as numpy's x.astype(float32) / 255: the same bits
        train, validation, test = (Split(s.features.to(torch.float32) / pixel_scale, s.targets)
                                   for s in (train, validation, test))
    return Dataset(train=train, validation=validation, test=test)


def check_sample_counts(cfg: Config, num_train_file: int) -> None:
    """The files may hold fewer samples than the data set is known for (a cut-down copy):
    the validation split and every batch size must still fit."""
    validation_size = cfg.data.validation_size
    if validation_size >= num_train_file:
        raise InputError(f"data.validation_size: {validation_size} leaves no training data: the training "
                         f"files hold {num_train_file} samples; expected < {num_train_file}")
    train_size = cfg.train_size_of(num_train_file)
    key, sizes = cfg.batch_sizes()
    if max(sizes) > train_size:
        raise InputError(f"{key}: {max(sizes)} is larger than the training set the files hold ({train_size} "
                         f"samples after the validation split); expected <= {train_size}")


def split_validation(split: Split, validation_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out ``validation_size`` samples of the training set, chosen by a seeded permutation."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    # Sorted so the training set keeps the file's order: results do not depend on
    # the split beyond which samples were held out.
    kept, held = order[validation_size:].sort().values, order[:validation_size].sort().values
    return Split(*split.batch(kept)), Split(*split.batch(held))


def _digits(seed: int):
    """scikit-learn's bundled digits (always offline), read from its CSV without importing scikit-learn,
    whose import costs each process (every torchrun rank, every Ray worker) about a second."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("data.dataset 'digits': scikit-learn is not installed; expected it "
                         "(pip install scikit-learn), whose package holds the digits")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")
    x = (table[:, :-1] / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test_size = KNOWN_SPLIT_SIZES["digits"][1]
    test, train = np.sort(order[:test_size]), np.sort(order[test_size:])
    return x[train], y[train], x[test], y[test]


def _synthetic(cfg: Config):
    """The note's example: uniform random images, targets 0..num_targets-1 in turn."""
    syn = cfg.data.synthetic
    n = syn.num_train + syn.num_test
    x = torch.rand(n, syn.num_features, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    y = (np.arange(n) % syn.num_targets).astype(np.int64)
    return x[: syn.num_train], y[: syn.num_train], x[syn.num_train:], y[syn.num_train:]


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each rank trains on at each step of an epoch.

    Every epoch draws one permutation from ``(seed, epoch)``, the same on every rank (so a
    resumed run replays it). Step ``s`` takes the global batch ``perm[s*B:(s+1)*B]`` and rank
    ``r`` of ``W`` the r-th of W contiguous pieces of it; with ``drop_last`` the smaller last
    batch is skipped.
    """

    num_samples: int
    global_batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    # A batch that changes during the run (core/batch_schedule.py): asked before each step for the global
    # batch it takes; steps then walk the permutation by their own sizes until it is used up.
    batch_now: Optional[Callable[[], int]] = None

    def __post_init__(self):
        check_divisible_by_world_size("optim.global_batch_size", self.global_batch_size, self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """An epoch's steps; with ``batch_now``, at the batch it gives now (a batch that changes mid-epoch
        makes the epoch's count another)."""
        batch = self.global_batch_size if self.batch_now is None else self.batch_now()
        return steps_per_epoch(self.num_samples, batch, self.drop_last)

    def permutation(self, epoch: int, device=None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        return perm if device is None else perm.to(device)

    def local_batches(self, epoch: int, device=None) -> Iterator[tuple[torch.Tensor, int]]:
        """Yield ``(local indices, global batch size)`` for every step of ``epoch``."""
        perm = self.permutation(epoch, device)
        if self.batch_now is not None:
            yield from self._scheduled_batches(perm)
            return
        for step in range(self.steps_per_epoch):
            global_batch = perm[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            # Equal pieces for a full batch; for the last, smaller one they differ by at most one sample.
            yield torch.tensor_split(global_batch, self.world_size)[self.rank], len(global_batch)

    def _scheduled_batches(self, perm: torch.Tensor) -> Iterator[tuple[torch.Tensor, int]]:
        """``local_batches`` with the global batch of each step asked of ``batch_now``."""
        start = 0
        while start < self.num_samples:
            size = self.batch_now()
            if self.drop_last and start + size > self.num_samples:
                return
            global_batch = perm[start:start + size]
            start += size
            yield torch.tensor_split(global_batch, self.world_size)[self.rank], len(global_batch)
