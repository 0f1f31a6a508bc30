"""IDX reader on the real files and on damaged copies; sources; the per-rank batch plan."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from conftest import smoke_config
from harness.core.config import load_config
from harness.core.data import BatchPlan, Split, load_dataset, read_idx, split_validation
from harness.errors import InputError
from conftest import CONFIGS


def test_real_fashion_mnist_files(fashion_dir):
    images = read_idx(fashion_dir / "train-images-idx3-ubyte.gz", expect_ndim=3)
    labels = read_idx(fashion_dir / "train-labels-idx1-ubyte.gz", expect_ndim=1)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    assert read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)


def test_features_are_the_files_pixels_over_255_in_float32_for_every_split(fashion_dir, tmp_path):
    """load_dataset scales only the rows it keeps: the values are numpy's x.astype(float32) / 255 of the
    held-out permutation's rows, bit for bit."""
    images = read_idx(fashion_dir / "train-images-idx3-ubyte.gz").reshape(60000, -1)
    expected = torch.from_numpy(images.astype(np.float32) / 255.0)
    data = load_dataset(smoke_config(tmp_path))
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    kept, held = order[256:].sort().values[:512], order[:256].sort().values
    assert data.train.features.dtype == torch.float32
    assert torch.equal(data.train.features, expected[kept]) and torch.equal(data.validation.features, expected[held])


def test_digits_are_scikit_learns_digits(tmp_path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = load_dataset(smoke_config(tmp_path, "data.dataset=digits", "data.train_subset=null",
                                     "data.test_subset=null", "data.validation_size=1"))
    features = torch.cat([data.train.features, data.validation.features, data.test.features])
    targets = torch.cat([data.train.targets, data.validation.targets, data.test.targets])
    order = torch.from_numpy(np.lexsort((targets.numpy(), *features.numpy().T[::-1])))
    reference = torch.from_numpy((bunch.data / 16.0).astype(np.float32))
    by_row = torch.from_numpy(np.lexsort((bunch.target, *bunch.data.T[::-1])))
    assert torch.equal(features[order], reference[by_row])
    assert torch.equal(targets[order], torch.from_numpy(bunch.target.astype(np.int64))[by_row])


@pytest.fixture
def copied_fashion(fashion_dir, tmp_path):
    """The four real files, decompressed into a folder the test may damage."""
    for src in fashion_dir.glob("*.gz"):
        (tmp_path / src.name[:-3]).write_bytes(gzip.decompress(src.read_bytes()))
    return tmp_path


def _load(folder, tmp_path):
    cfg = smoke_config(tmp_path, f"data.data_dir={folder}")
    return load_dataset(cfg)


def test_raw_idx_files_load_from_data_dir(copied_fashion, tmp_path):
    data = _load(copied_fashion, tmp_path)
    assert len(data.train) == 512 and len(data.validation) == 256 and len(data.test) == 512
    assert data.train.features.shape[1] == 784 and float(data.train.features.max()) <= 1.0


def test_truncated_file_names_file_and_defect(copied_fashion, tmp_path):
    path = copied_fashion / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte: truncated: 47039916 bytes, expected 47040016"):
        _load(copied_fashion, tmp_path)


def test_wrong_magic_number(copied_fashion, tmp_path):
    path = copied_fashion / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0] = 0x1F
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte: wrong magic number 0x1f000801"):
        _load(copied_fashion, tmp_path)


def test_wrong_dimensions(copied_fashion, tmp_path):
    # Swap the labels file in for the images: a 1-D file where 3-D is expected.
    shutil.copy(copied_fashion / "train-labels-idx1-ubyte", copied_fashion / "train-images-idx3-ubyte")
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte: wrong number of dimensions 1; expected 3"):
        _load(copied_fashion, tmp_path)


def test_label_out_of_range(copied_fashion, tmp_path):
    path = copied_fashion / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[8 + 17] = 12
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte: label 12 out of range; expected 0..9"):
        _load(copied_fashion, tmp_path)


def test_corrupt_gzip(fashion_dir, tmp_path):
    for src in fashion_dir.glob("*.gz"):
        shutil.copy(src, tmp_path / src.name)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(InputError, match=r"train-labels-idx1-ubyte.gz: corrupt gzip stream"):
        _load(tmp_path, tmp_path)


def test_missing_mnist_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    cfg = smoke_config(tmp_path, "data.dataset=mnist", f"data.data_dir={tmp_path}/empty")
    with pytest.raises(InputError, match=r"data.data_dir: .*/empty does not hold the mnist IDX files .*"
                                         r"put the four MNIST IDX files"):
        load_dataset(cfg)


def test_harness_data_dir_is_searched(copied_fashion, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(copied_fashion))
    cfg = smoke_config(tmp_path, "data.dataset=mnist")  # mnist has no Debian fallback
    assert len(load_dataset(cfg).test) == 512


def test_digits_and_synthetic_sources_are_offline_and_seeded(tmp_path):
    digits = load_dataset(smoke_config(tmp_path, "data.dataset=digits", "data.validation_size=100"))
    assert digits.train.features.shape[1] == 64 and len(digits.test) == 360
    seed_cfg = load_config(CONFIGS / "seed.yaml")
    first, second = load_dataset(seed_cfg), load_dataset(seed_cfg)
    assert torch.equal(first.train.features, second.train.features)
    assert first.train.targets.tolist() == [0, 1, 2, 3, 4]


def test_validation_split_is_disjoint_and_seeded():
    split = Split(torch.arange(100, dtype=torch.float32)[:, None], torch.arange(100))
    train, val = split_validation(split, 20, seed=3)
    ids = set(train.targets.tolist()) | set(val.targets.tolist())
    assert len(val) == 20 and len(ids) == 100
    assert torch.equal(split_validation(split, 20, seed=3)[1].targets, val.targets)
    assert not torch.equal(split_validation(split, 20, seed=4)[1].targets, val.targets)


@pytest.mark.parametrize("num_samples,batch,world", [(100, 20, 2), (103, 20, 2), (64, 8, 4), (7, 4, 2)])
def test_rank_shards_are_disjoint_and_cover_the_epoch_once(num_samples, batch, world):
    plans = [BatchPlan(num_samples, batch, seed=1, rank=r, world_size=world) for r in range(world)]
    seen = []
    for step_batches in zip(*(p.local_batches(epoch=2) for p in plans)):
        pieces = [set(idx.tolist()) for idx, _ in step_batches]
        assert all(a.isdisjoint(b) for i, a in enumerate(pieces) for b in pieces[i + 1:])
        global_sizes = {g for _, g in step_batches}
        assert len(global_sizes) == 1 and sum(map(len, pieces)) == global_sizes.pop()
        seen.extend(i for piece in pieces for i in piece)
    assert sorted(seen) == list(range(num_samples))


def test_shards_of_one_step_make_up_the_single_process_batch():
    single = [idx for idx, _ in BatchPlan(96, 32, seed=5).local_batches(epoch=1)]
    ranks = [[idx for idx, _ in BatchPlan(96, 32, seed=5, rank=r, world_size=2).local_batches(epoch=1)] for r in range(2)]
    for step, batch in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), batch)


def test_permutation_is_seeded_per_epoch():
    plan = BatchPlan(50, 10, seed=0)
    assert torch.equal(plan.permutation(3), BatchPlan(50, 10, seed=0).permutation(3))
    assert not torch.equal(plan.permutation(3), plan.permutation(4))
    assert not torch.equal(plan.permutation(3), BatchPlan(50, 10, seed=1).permutation(3))


def test_drop_last_skips_the_short_batch():
    plan = BatchPlan(103, 20, seed=0, drop_last=True)
    assert plan.steps_per_epoch == 5 and all(len(i) == 20 for i, _ in plan.local_batches(0))
