from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_csiro_pair

from hipseg_lib import HipsegError
from hipseg_lib.augment import RandomAugmentation, RandomPatch
from hipseg_lib.data import TrainingBatches, TrainingSet, cache_pairs, cases_of, split_by_case
from hipseg_lib.io import Pair, VolumeId, find_pairs
from hipseg_lib.preprocess import Preprocessing


def _fake_pairs(n_cases, weeks=3):
    from pathlib import Path
    return [Pair(VolumeId(f"{c:03d}", w), Path(f"i{c}_{w}"), Path(f"l{c}_{w}"))
            for c in range(n_cases) for w in range(weeks)]


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
    with pytest.raises(HipsegError, match="too few patients to split: 2 found"):
        split_by_case(_fake_pairs(2))


def test_cache_is_reused_and_invalidated(tmp_path):
    root = tmp_path / "d"
    write_csiro_pair(root, "001", 0)
    pairs = find_pairs(root).pairs
    cache = tmp_path / "cache"
    prep = Preprocessing(target_shape=(8, 8, 4))
    v1 = cache_pairs(pairs, prep, cache)[0]
    assert v1.box == ((0, 16), (0, 16), (0, 8)) and v1.grid_spacing == (4.0, 4.0, 6.0), "a 16x16x8 crop of 2x2x3 mm"
    img, lab = v1.load()
    assert img.shape == (8, 8, 4) and lab.dtype == np.uint8
    mtime = v1.image.stat().st_mtime_ns
    v2 = cache_pairs(pairs, prep, cache)[0]
    assert v2.image == v1.image and v2.image.stat().st_mtime_ns == mtime
    v3 = cache_pairs(pairs, Preprocessing(target_shape=(16, 16, 8)), cache)[0]
    assert v3.image != v1.image


def _volumes(tmp_path, n=4, shape=(16, 16, 8)):
    root = tmp_path / "d"
    for c in range(n):
        write_csiro_pair(root, f"{c + 1:03d}", 0, seed=c)
    return cache_pairs(find_pairs(root).pairs, Preprocessing(target_shape=shape), tmp_path / "c", workers=1)


def _epochs(batches, epochs):
    return [[(tuple(idx), *batches.batch(e, idx)) for idx in batches.order(e)] for e in epochs]


def test_batches_differ_between_epochs_and_repeat_within_one(tmp_path):
    """The bug this replaces: DataLoader workers with persistent_workers kept epoch 0 forever."""
    vols = _volumes(tmp_path)
    ts = TrainingSet(vols, torch.device("cpu"))
    assert ts.images.shape == (4, 1, 16, 16, 8) and ts.labels.dtype == torch.uint8
    img, lab = vols[2].load()
    assert torch.equal(ts.images[2, 0], torch.from_numpy(img)) and torch.equal(ts.labels[2], torch.from_numpy(lab))
    batches = TrainingBatches(ts, 2, seed=3, augmentation=RandomAugmentation())
    e0, e1 = _epochs(batches, (0, 1))
    again = _epochs(TrainingBatches(TrainingSet(vols, torch.device("cpu")), 2, seed=3,
                                    augmentation=RandomAugmentation()), (1,))[0]
    for (ia, xa, ya), (ib, xb, yb) in zip(e1, again):
        assert ia == ib and torch.equal(xa, xb) and torch.equal(ya, yb), "the same epoch gives the same batches"
    first = {i: x[k] for idx, x, _ in e0 for k, i in enumerate(idx)}
    second = {i: x[k] for idx, x, _ in e1 for k, i in enumerate(idx)}
    assert sorted(first) == sorted(second) == [0, 1, 2, 3]
    assert sum(not torch.equal(first[i], second[i]) for i in first) >= 3, "another epoch, other augmentations"
    assert [idx for idx, _, _ in e0] != [idx for idx, _, _ in e1], "and another order"



def test_no_seed_replays_another_seeds_epochs(tmp_path):
    """Seed 1's epoch 0 is not seed 0's epoch 1 (as with a generator seeded with seed + epoch)."""
    ts = TrainingSet(_volumes(tmp_path, n=8), torch.device("cpu"))
    orders = {s: [TrainingBatches(ts, 1, seed=s).order(e) for e in range(3)] for s in (0, 1)}
    assert all(orders[1][e] != orders[0][e + 1] for e in range(2)), orders
    assert orders[0] == [TrainingBatches(ts, 1, seed=0).order(e) for e in range(3)], "and each seed repeats"


def test_patches_are_cut_before_augmentation_and_centred_on_organs(tmp_path):
    vols = _volumes(tmp_path)
    batches = TrainingBatches(TrainingSet(vols, torch.device("cpu")), 2, seed=1, patch=RandomPatch((8, 8, 8), 1.0))
    for idx in batches.order(0):
        x, y = batches.batch(0, idx)
        assert x.shape == (2, 1, 8, 8, 8) and y.shape == (2, 8, 8, 8)
        assert all((lab > 0).any() for lab in y), "every patch centred on an organ holds one"


def test_batches_split_over_processes_as_one_global_batch(tmp_path):
    """Two processes of batch 1 see, between them, the samples one process of batch 2 sees."""
    vols = _volumes(tmp_path)
    ts = TrainingSet(vols, torch.device("cpu"))
    one = TrainingBatches(ts, 2, seed=0, augmentation=RandomAugmentation())
    ranks = [TrainingBatches(ts, 1, seed=0, augmentation=RandomAugmentation(), rank=r, world=2) for r in (0, 1)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == 2
    for step, idx in enumerate(one.order(1)):
        x, _ = one.batch(1, idx)
        parts = [r.batch(1, r.order(1)[step])[0] for r in ranks]
        assert sorted(idx) == sorted(r.order(1)[step][0] for r in ranks)
        for k, i in enumerate(idx):
            r = [rk.order(1)[step][0] for rk in ranks].index(i)
            assert torch.equal(parts[r][0], x[k]), "a sample's augmentation depends on the sample, not the process"


def test_parallel_preprocessing_writes_the_same_bytes_as_serial(tmp_path):
    root = tmp_path / "d"
    for c in range(4):
        write_csiro_pair(root, f"{c + 1:03d}", c % 2, seed=c, shape=(20, 18, 10))
    pairs = find_pairs(root).pairs
    prep = Preprocessing(target_shape=(16, 16, 8))
    serial = cache_pairs(pairs, prep, tmp_path / "serial", workers=1)
    parallel = cache_pairs(pairs, prep, tmp_path / "parallel", workers=2)
    assert [v.id for v in serial] == [v.id for v in parallel] == [p.id for p in pairs]
    files = sorted(f.name for f in (tmp_path / "serial").iterdir())
    assert len(files) == 12 and files == sorted(f.name for f in (tmp_path / "parallel").iterdir())
    for name in files:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name
    assert [(v.box, v.grid_spacing) for v in serial] == [(v.box, v.grid_spacing) for v in parallel]


def test_parallel_preprocessing_names_a_bad_file(tmp_path):
    root = tmp_path / "d"
    for c in range(3):
        write_csiro_pair(root, f"{c + 1:03d}", 0, seed=c)
    bad = root / "semantic_labels_anon" / "Case_002_Week0_SEMANTIC_LFOV.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(HipsegError, match="Case_002_Week0_SEMANTIC_LFOV.nii.gz"):
        cache_pairs(find_pairs(root).pairs, Preprocessing(target_shape=(8, 8, 4)), tmp_path / "c", workers=2)


def test_parallel_preprocessing_from_a_script_without_a_main_guard(tmp_path):
    """A student's script that calls the library at top level: the pool must not re-run it."""
    import subprocess
    import sys

    root = tmp_path / "d"
    for c in range(3):
        write_csiro_pair(root, f"{c + 1:03d}", 0, seed=c)
    script = tmp_path / "script.py"
    script.write_text(
        "from hipseg_lib.data import cache_pairs\n"
        "from hipseg_lib.io import find_pairs\n"
        "from hipseg_lib.preprocess import Preprocessing\n"
        f"vols = cache_pairs(find_pairs({str(root)!r}).pairs, Preprocessing(target_shape=(8, 8, 4)), "
        f"{str(tmp_path / 'c')!r}, workers=2)\n"
        "print(len(vols))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr[-2000:]


def test_cache_key_follows_the_code_that_computes_it(tmp_path, monkeypatch):
    """A change to the code that computes the cache makes new cache files; a version number does
    not matter (the files are named by what made them)."""
    import hipseg_lib
    import hipseg_lib.data as D

    root = tmp_path / "d"
    write_csiro_pair(root, "001", 0)
    pair = find_pairs(root).pairs[0]
    prep = Preprocessing(target_shape=(8, 8, 4))

    def cached_file():
        return D.cache_pairs([pair], prep, tmp_path / "c", workers=1)[0].image

    first = cached_file()
    monkeypatch.setattr(hipseg_lib, "__version__", "9.9.9")
    assert cached_file() == first, "the version number is not what names the cache"
    # an edit to the loading/validation or the preprocessing source names new files
    import shutil
    lib = tmp_path / "lib"
    shutil.copytree(Path(D.__file__).parent, lib)
    monkeypatch.setattr(D, "__file__", str(lib / "data.py"))
    assert cached_file() == first, "the same source, the same files"
    for name in ("io", "preprocess"):
        source = (lib / f"{name}.py").read_text()
        (lib / f"{name}.py").write_text(source + "\n# edited\n")
        assert cached_file() != first, f"an edit to {name}.py must make new cache files"
        (lib / f"{name}.py").write_text(source)
    (lib / "viz.py").write_text("# unrelated\n")
    assert cached_file() == first, "code that does not compute the cache does not change it"


@pytest.mark.parametrize("n_cases, folds", [(30, 5), (10, 3), (6, 5)])
def test_folds_keep_the_test_patients_and_validate_each_other_patient_once(n_cases, folds):
    """Cross-validation as nnU-Net does it: the same test patients in every fold, and the other
    patients dealt into `folds` groups, each validating once; the default split is untouched."""
    pairs = _fake_pairs(n_cases)
    plain = split_by_case(pairs, seed=3)
    tests = set(cases_of(plain["test"]))
    rest = set(cases_of(pairs)) - tests
    seen = []
    for k in range(folds):
        split = split_by_case(pairs, seed=3, fold=k, folds=folds)
        sets = {name: set(cases_of(v)) for name, v in split.items()}
        assert sets["test"] == tests, "the test patients never move"
        assert sets["val"] | sets["train"] == rest and not sets["val"] & sets["train"]
        assert len(rest) // folds <= len(sets["val"]) <= -(-len(rest) // folds), "even groups"
        seen += sorted(sets["val"])
    assert sorted(seen) == sorted(rest), "every other patient validates exactly once"
    assert split_by_case(pairs, seed=3, fold=None) == plain


def test_a_fold_out_of_range_or_too_few_patients_is_refused():
    from hipseg_lib import SettingsError
    from hipseg_lib.config import make_config

    with pytest.raises(SettingsError, match="fold must be 0 to folds - 1 and folds >= 2, got fold 5 of 5"):
        make_config("cpu", fold=5)
    with pytest.raises(SettingsError, match="got fold 0 of 1"):
        split_by_case(_fake_pairs(10), fold=0, folds=1)
    with pytest.raises(HipsegError, match="too few patients for 5 folds: 3 outside the test set"):
        split_by_case(_fake_pairs(4), fold=0, folds=5)


def test_training_loads_the_folds_validation_patients(tiny_synth, tmp_path):
    from hipseg_lib.config import make_config
    from hipseg_lib.data import load_split_volumes, split_folder

    cfg = make_config("smoke", fold=1, folds=2)
    vols = load_split_volumes(tiny_synth, cfg, tmp_path / "cache")
    want = split_folder(tiny_synth, cfg.split_seed, fold=1, folds=2)
    assert [v.id for v in vols["val"]] == [p.id for p in want["val"]]
    assert [v.id for v in vols["val"]] != [p.id for p in split_folder(tiny_synth, cfg.split_seed)["val"]]


def test_workers_are_counted_from_the_processs_share_of_cpus_not_the_machines():
    """Under Slurm a job gets some of a node's CPUs (its affinity mask); os.cpu_count() would
    count them all and oversubscribe the node."""
    import os

    from hipseg_lib import available_cpus

    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})
    try:
        assert available_cpus() == 1
    finally:
        os.sched_setaffinity(0, mine)
    assert available_cpus() == len(mine)
