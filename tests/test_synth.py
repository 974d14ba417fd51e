from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from hipseg_lib import HipsegError
from hipseg_lib.check import audit_folder
from hipseg_lib.data import split_by_case
from hipseg_lib.io import find_pairs, load_volume
from hipseg_lib.metrics import dice_per_class
from hipseg_lib.synth import ANATOMY, SynthSpec, anatomy_of, make_case_anatomy, make_dataset, render_volume


def test_layout_and_validity(tiny_synth):
    audit = audit_folder(tiny_synth)
    assert audit.problems == []
    assert (tiny_synth / "semantic_MRs_anon").is_dir() and (tiny_synth / "semantic_labels_anon").is_dir()
    assert len(audit.volumes_per_case) == 6
    assert all(2 <= n <= 3 for n in audit.volumes_per_case.values())
    assert {r.orientation for r in audit.rows} == {"LPS"}
    assert {r.shape[:2] for r in audit.rows} == {(32, 32)}
    # Most volumes have the base depth, and only depths 16 and round(16*144/128)=18 occur.
    assert {r.shape[2] for r in audit.rows} <= {16, 18}
    # anisotropic spacing
    assert all(r.spacing[2] != r.spacing[0] for r in audit.rows)


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "user_data"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(HipsegError, match="already exists"):
        make_dataset(out, cases=1, shape=(16, 16, 16))
    with pytest.raises(HipsegError, match="not a synthetic set"):
        make_dataset(out, cases=1, shape=(16, 16, 16), overwrite=True)
    assert (out / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_data"]  # no temp folder left


def test_anatomy_proportions_and_weeks_differ():
    rng = np.random.default_rng(0)
    anat = make_case_anatomy(rng)
    spec = SynthSpec((128, 128, 64), (3.6, 3.6, 4.0))
    img0, lab0 = render_volume(anat, spec, np.random.default_rng([0, 0]))
    img1, lab1 = render_volume(anat, spec, np.random.default_rng([0, 1]))
    frac = np.bincount(lab0.ravel(), minlength=6) / lab0.size
    assert np.all(frac > 0), "every class is present"
    assert frac[5] < 0.01, "prostate well under 1% of voxels"
    assert frac[0] / frac[5] > 300, "background outnumbers the prostate by hundreds"
    assert frac[1] > frac[2] > frac[5] and frac[3] > frac[5]
    # Same anatomy, different week: bones almost identical, bladder differs.
    d = dice_per_class(lab1, lab0)
    assert d[2] > 0.6 and d[3] < 0.99
    other = render_volume(make_case_anatomy(np.random.default_rng(5)), spec, np.random.default_rng([5, 0]))[1]
    assert dice_per_class(other, lab0)[5] < d[5] + 0.2


def test_class_intensities_overlap():
    anat = make_case_anatomy(np.random.default_rng(2))
    img, lab = render_volume(anat, SynthSpec((96, 96, 48), (4.8, 4.8, 5.3)), np.random.default_rng(1))
    ranges = {c: np.percentile(img[lab == c], [10, 90]) for c in range(1, 6)}
    # Prostate intensities fall inside the body's range; rectum inside the body's too.
    for c in (4, 5):
        assert ranges[1][0] < np.median(img[lab == c]) < ranges[1][1]


def test_needs_spatial_context(tiny_synth, tmp_path):
    """A per-voxel intensity classifier (histogram MAP, fitted on training cases) scores
    mean foreground Dice below 0.5 on the test cases: intensity alone cannot segment it."""
    from hipseg_lib.baseline import fit_intensity_classifier
    from hipseg_lib.data import cache_pairs
    from hipseg_lib.preprocess import Preprocessing

    split = split_by_case(find_pairs(tiny_synth).pairs, seed=0)
    prep = Preprocessing(target_shape=(32, 32, 16))
    train = cache_pairs(split["train"], prep, tmp_path / "cache")
    test = cache_pairs(split["test"] + split["val"], prep, tmp_path / "cache")
    dice = {}
    for balanced in (False, True):
        clf = fit_intensity_classifier([v.load() for v in train], balanced=balanced)
        dice[balanced] = np.nanmean([dice_per_class(clf.predict(image), label)
                                     for image, label in (v.load() for v in test)], axis=0)
        assert np.nanmean(dice[balanced][1:]) < 0.5
    assert dice[False][1] > 0.5, "the most accurate intensity classifier gets the dominant body class"
    assert np.nanmax(dice[True][2:]) > 0, "the class-balanced one does find small classes somewhere"


def test_tissues_are_t2_like():
    """On T2: urine brighter than fat, fat brighter than muscle; cortical bone and gas darkest;
    fatty marrow brighter than the cortex around it; the prostate's peripheral zone brighter than
    its transition zone."""
    from hipseg_lib.synth import TISSUES

    rows = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        img, lab, kind = render_volume(make_case_anatomy(rng), SynthSpec((96, 96, 48), (3.6, 3.6, 4.0)),
                                       np.random.default_rng([seed, 0]), return_tissue=True)
        mean = {t: float(img[kind == i].mean()) for i, t in enumerate(TISSUES) if (kind == i).sum() > 20}
        rows.append(mean)
        # The bias field is smooth but strong (it can make fat at the skin brighter than urine in
        # the middle), so contrast is compared where the tissues meet: within ~2 cm of the bladder.
        near = ndimage.binary_dilation(lab == 3, iterations=6)
        local = {t: float(img[(kind == i) & near].mean()) for i, t in enumerate(TISSUES)
                 if ((kind == i) & near).sum() > 20}
        assert local["urine"] > local["fat"] > local["muscle"] > local["cortex"]
        assert mean["marrow"] > 2 * mean["cortex"] and mean["prostate_pz"] > mean["prostate_tz"]
        assert (lab[kind == TISSUES.index("urine")] == 3).all() and (lab[kind == TISSUES.index("muscle")] == 1).all()
    # muscle is not flat: its bundles and fat septa give it texture
    assert all(r["muscle"] > 0 for r in rows)
    rng = np.random.default_rng(0)
    img, _, kind = render_volume(make_case_anatomy(rng), SynthSpec((96, 96, 48), (3.6, 3.6, 4.0)),
                                 np.random.default_rng([0, 0]), return_tissue=True)
    muscle = img[kind == TISSUES.index("muscle")].astype(float)
    assert muscle.std() / muscle.mean() > 0.2


def _digests(root):
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    """Two runs of one seed, in one process and in two, write the same files byte for byte."""
    a = make_dataset(tmp_path / "a", seed=3, cases=3, shape=(24, 24, 16), weeks=(1, 2), workers=1)
    b = make_dataset(tmp_path / "b", seed=3, cases=3, shape=(24, 24, 16), weeks=(1, 2), workers=2)
    da, db = _digests(a), _digests(b)
    assert len(da) == 2 * sum(1 for _ in (a / "semantic_MRs_anon").iterdir()) + 1
    assert da == db


# The arrays of a small set as this code makes it, by anatomy generation (synth.ANATOMY). Shapes
# use only arithmetic that rounds alike on every x86 CPU (see synth._along and
# synth._plane_wave), so a machine that gets other arrays from this synth.py computes
# differently, which is a bug to report. Changing the arrays on purpose: add one to
# synth.ANATOMY (so default sets made before are remade) and record the digest printed here.
RECORDED_ARRAYS = {2: "05843a1bd5a999043f9945ce170a2c73966078ae0bc05afb08d905541b155b6f"}


def test_same_arrays_as_recorded(tmp_path):
    import hashlib

    root = make_dataset(tmp_path / "s", seed=3, cases=2, shape=(24, 24, 16), weeks=(1, 2), workers=1)
    h = hashlib.sha256()
    for pair in find_pairs(root).pairs:
        h.update(np.ascontiguousarray(load_volume(pair.image).array).tobytes())
        h.update(np.ascontiguousarray(load_volume(pair.label, "label").array).tobytes())
    assert ANATOMY in RECORDED_ARRAYS, f"anatomy {ANATOMY}: record its digest {h.hexdigest()}"
    assert h.hexdigest() == RECORDED_ARRAYS[ANATOMY], (
        f"arrays differ from those recorded for anatomy {ANATOMY}: if on purpose, add one to "
        f"synth.ANATOMY and record {h.hexdigest()}")


def test_a_set_records_its_anatomy_generation(tmp_path):
    root = make_dataset(tmp_path / "s", seed=1, cases=1, shape=(16, 16, 16), weeks=(1, 1), workers=1)
    assert anatomy_of(root) == ANATOMY
    meta = json.loads((root / "synth.json").read_text())
    del meta["anatomy"]  # as sets made before the generation was recorded
    (root / "synth.json").write_text(json.dumps(meta))
    assert anatomy_of(root) == 1
    assert anatomy_of(tmp_path) is None, "a folder without synth.json is not a hipseg set"
    (tmp_path / "synth.json").write_text("[1]")
    assert anatomy_of(tmp_path) is None


def test_a_default_set_of_an_older_anatomy_is_moved_aside_and_made_anew(tmp_path, monkeypatch, capsys):
    """An updated checkout must not teach from the stand-in an older generator made. resolve_data_dir
    only resolves (and says what to do); ensure_default_dataset remakes the set and keeps the old one
    beside it (nothing is lost)."""
    from hipseg_lib import synth
    from hipseg_lib.locations import ensure_default_dataset, resolve_data_dir

    project = tmp_path / "project"
    (project / "book").mkdir(parents=True)
    (project / "_config.yml").write_text("title: x\n")
    monkeypatch.setenv("HIPSEG_ROOT", str(project))
    monkeypatch.delenv("HIPSEG_DATA", raising=False)
    small = functools.partial(make_dataset, seed=1, cases=1, shape=(16, 16, 16), weeks=(1, 1), workers=1)
    monkeypatch.setattr(synth, "make_dataset", small)
    default = project / "data" / "synthetic"
    with pytest.raises(HipsegError, match=r"no data yet \(ensure_default_dataset\(\) makes it\)"):
        resolve_data_dir()

    def old_set():
        default.mkdir(parents=True)
        (default / "synth.json").write_text(json.dumps({"generator": "hipseg synth", "seed": 0}))
        (default / "notes.txt").write_text("mine")

    old_set()
    with pytest.raises(HipsegError, match=r"older generator .anatomy 1, now .*ensure_default_dataset\(\) renews it"):
        resolve_data_dir()  # resolving makes nothing, moves nothing
    assert anatomy_of(default) == 1
    assert ensure_default_dataset() == default
    assert anatomy_of(default) == ANATOMY and find_pairs(default).pairs
    assert (project / "data" / "synthetic.anatomy-1" / "notes.txt").read_text() == "mine"
    assert "older generator (anatomy 1" in capsys.readouterr().out
    stamp = (default / "synth.json").stat().st_mtime_ns
    assert resolve_data_dir() == ensure_default_dataset() == default
    assert (default / "synth.json").stat().st_mtime_ns == stamp, "a set of this generation is used as it is"
    shutil.rmtree(default)
    old_set()
    ensure_default_dataset()
    assert (project / "data" / "synthetic.anatomy-1-2" / "notes.txt").exists(), "an earlier one is kept too"
    assert (project / "data" / "synthetic.anatomy-1" / "notes.txt").exists()
