from __future__ import annotations

import numpy as np
import pytest
import torch

from hipseg_lib import HipsegError
from hipseg_lib.augment import default_augmentation
from hipseg_lib.data import SegmentationDataset, cache_pairs, cases_of, split_by_case
from hipseg_lib.io import Pair, VolumeId, find_pairs
from hipseg_lib.preprocess import Preprocessing

from conftest import write_csiro_pair


def _fake_pairs(n_cases, weeks=3):
    from pathlib import Path
    return [Pair(VolumeId(f"{c:03d}", w), Path(f"i{c}_{w}"), Path(f"l{c}_{w}")) for c in range(n_cases) for w in range(weeks)]


@pytest.mark.parametrize("n_cases", [3, 10, 38])
def test_split_by_case_no_shared_case(n_cases):
    pairs = _fake_pairs(n_cases)
    split = split_by_case(pairs, seed=0)
    sets = {k: set(cases_of(v)) for k, v in split.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sum(len(v) for v in split.values()) == len(pairs)
    assert all(len(s) >= 1 for s in sets.values())
    if n_cases == 38:
        assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (30, 4, 4)
    assert split == split_by_case(pairs, seed=0)
    assert split != split_by_case(pairs, seed=1) or n_cases == 3


def test_split_too_few_cases():
    with pytest.raises(HipsegError, match="too few cases to split: 2 found"):
        split_by_case(_fake_pairs(2))


def test_cache_is_reused_and_invalidated(tmp_path):
    root = tmp_path / "d"
    write_csiro_pair(root, "001", 0)
    pairs = find_pairs(root).pairs
    cache = tmp_path / "cache"
    prep = Preprocessing(target_shape=(8, 8, 4))
    v1 = cache_pairs(pairs, prep, cache)[0]
    assert v1.original_shape == (16, 16, 8) and v1.spacing == (2.0, 2.0, 3.0)
    img, lab = v1.load()
    assert img.shape == (8, 8, 4) and lab.dtype == np.uint8
    mtime = v1.image.stat().st_mtime_ns
    v2 = cache_pairs(pairs, prep, cache)[0]
    assert v2.image == v1.image and v2.image.stat().st_mtime_ns == mtime
    v3 = cache_pairs(pairs, Preprocessing(target_shape=(16, 16, 8)), cache)[0]
    assert v3.image != v1.image


def test_dataset_items_and_replayable_augmentation(tmp_path):
    root = tmp_path / "d"
    for c in ("001", "002"):
        write_csiro_pair(root, c, 0, seed=int(c))
    vols = cache_pairs(find_pairs(root).pairs, Preprocessing(target_shape=(16, 16, 8)), tmp_path / "c")
    ds = SegmentationDataset(vols, default_augmentation(), seed=3)
    x, y = ds[0]
    assert x.shape == (1, 16, 16, 8) and x.dtype == torch.float32
    assert y.shape == (16, 16, 8) and y.dtype == torch.int64
    again = SegmentationDataset(vols, default_augmentation(), seed=3, in_memory=False)
    for i in range(2):
        torch.testing.assert_close(ds[i][0], again[i][0])
    outs = []
    for e in range(6):
        ds.set_epoch(e)
        outs.append(ds[0][0])
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
