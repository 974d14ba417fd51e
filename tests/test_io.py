from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import LPS, make_pair_arrays, write_csiro_pair, write_nifti

from hipseg_lib import HipsegError
from hipseg_lib._atomic import save_nifti_atomic
from hipseg_lib.io import (
    VolumeId,
    find_pairs,
    load_pair,
    load_volume,
    pair_problems,
    parse_volume_name,
)


@pytest.mark.parametrize("name, expected", [
    ("Case_004_Week0_LFOV.nii.gz", (VolumeId("004", 0), "image")),
    ("Case_004_Week0_SEMANTIC_LFOV.nii.gz", (VolumeId("004", 0), "label")),
    ("B006_Week3_LFOV.nii.gz", (VolumeId("B006", 3), "image")),
    ("B006_Week3_SEMANTIC.nii.gz", (VolumeId("B006", 3), "label")),
    ("Case_040_Week5_SEMANTIC_LFOV.nii", (VolumeId("040", 5), "label")),
    ("notes.nii.gz", None),
    ("Case_004_Week0_LFOV.png", None),
])
def test_parse_volume_name(name, expected):
    assert parse_volume_name(name) == expected


def test_find_pairs_csiro_layout_pairs_by_id_not_sort_order(tmp_path):
    root = tmp_path / "HipMRI_study_complete_release_v1"
    write_csiro_pair(root, "004", 0)
    write_csiro_pair(root, "004", 1)
    write_csiro_pair(root, "010", 0)
    # An extra image whose label is missing would shift a sorted-list pairing by one.
    write_nifti(root / "semantic_MRs_anon" / "Case_007_Week0_LFOV.nii.gz", np.ones((4, 4, 4)))
    s = find_pairs(root)
    assert [str(p.id) for p in s.pairs] == ["004_Week0", "004_Week1", "010_Week0"]
    for p in s.pairs:
        assert parse_volume_name(p.image)[0] == parse_volume_name(p.label)[0] == p.id
    assert s.problems == ["semantic_MRs_anon/Case_007_Week0_LFOV.nii.gz: no matching label file"]


def test_find_pairs_reshared_layout_skips_keras_slices(tmp_path):
    root = tmp_path / "HipMRI"
    image, label = make_pair_arrays()
    write_nifti(root / "semantic_MRs" / "B006_Week0_LFOV.nii.gz", image)
    write_nifti(root / "semantic_labels_only" / "B006_Week0_SEMANTIC.nii.gz", label)
    write_nifti(root / "keras_slices_data" / "keras_slices_train" / "B006_Week0_LFOV.nii.gz", image[:, :, :1])
    s = find_pairs(root)
    assert len(s.pairs) == 1 and s.pairs[0].id == VolumeId("B006", 0)
    assert s.problems == []


def test_find_pairs_errors(tmp_path):
    with pytest.raises(HipsegError, match="no such folder"):
        find_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HipsegError, match="no .nii or .nii.gz files"):
        find_pairs(tmp_path / "empty")


def test_load_volume_dtypes_and_singleton_4th_dim(tmp_path):
    image, label = make_pair_arrays()
    p_img = write_nifti(tmp_path / "a_img.nii.gz", image[..., None], dtype=np.int16)
    p_lab = write_nifti(tmp_path / "a_lab.nii.gz", label.astype(np.float64))  # labels stored as floats
    v = load_volume(p_img, "image")
    assert v.array.dtype == np.float32 and v.shape == label.shape
    assert v.spacing == (2.0, 2.0, 3.0) and v.orientation == "LPS"
    lab = load_volume(p_lab, "label")
    assert lab.array.dtype == np.uint8
    np.testing.assert_array_equal(lab.array, label)


def test_load_volume_big_endian(tmp_path):
    image, _ = make_pair_arrays()
    p = tmp_path / "be.nii"
    nib.save(nib.Nifti1Image(image.astype(">f4"), LPS, header=nib.Nifti1Header(endianness=">")), p)
    assert nib.load(p).get_data_dtype().byteorder == ">"
    v = load_volume(p)
    assert v.array.dtype == np.float32 and v.array.dtype.isnative
    np.testing.assert_allclose(v.array, image)


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nothing.nii.gz", "no such file"),
    (lambda d: _write_bytes(d / "text.nii", b"not a nifti at all" * 30), "not a readable NIfTI"),
    (lambda d: write_nifti(d / "flat.nii.gz", np.ones((8, 8))), "expected a 3D volume"),
    (lambda d: write_nifti(d / "four.nii.gz", np.ones((8, 8, 4, 2))), "expected a 3D volume"),
    (lambda d: write_nifti(d / "nan.nii.gz", np.full((8, 8, 4), np.nan, np.float32)), "NaN or infinite"),
])
def test_load_volume_bad_input(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(HipsegError, match=message) as err:
        load_volume(path, "image")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_gzip(tmp_path):
    image, _ = make_pair_arrays((32, 32, 16))
    p = write_nifti(tmp_path / "t.nii.gz", image)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(HipsegError, match="truncated or corrupt"):
        load_volume(p)
    q = tmp_path / "c.nii.gz"
    q.write_bytes(gzip.compress(b"\x00" * 10)[:5] + b"garbage" * 50)
    with pytest.raises(HipsegError, match=str(q.name)):
        load_volume(q)


@pytest.mark.parametrize("values, message", [
    (np.array([0, 1, 7]), "label values 7 outside 0..5"),
    (np.array([0, -1, 2]), "outside 0..5"),
    (np.array([0.0, 1.5, 2.0]), "non-integer"),
])
def test_label_values_checked(tmp_path, values, message):
    arr = np.zeros((4, 4, 4), np.int16 if values.dtype.kind == "i" else np.float32)
    arr.flat[: values.size] = values
    p = write_nifti(tmp_path / "l.nii.gz", arr)
    with pytest.raises(HipsegError, match=message):
        load_volume(p, "label")


def test_pair_problems_shape_affine_constant(tmp_path):
    image, label = make_pair_arrays()
    img = load_volume(write_nifti(tmp_path / "i.nii.gz", image))
    lab_small = load_volume(write_nifti(tmp_path / "l1.nii.gz", label[:, :, :6]), "label")
    assert "shape (16, 16, 6) differs from its image (16, 16, 8)" in pair_problems(img, lab_small)[0]
    other = LPS.copy()
    other[0, 3] = 10
    lab_aff = load_volume(write_nifti(tmp_path / "l2.nii.gz", label, other), "label")
    assert "affine differs" in pair_problems(img, lab_aff)[0]
    flat = load_volume(write_nifti(tmp_path / "c.nii.gz", np.full(image.shape, 3.0, np.float32)))
    lab = load_volume(write_nifti(tmp_path / "l3.nii.gz", label), "label")
    assert "constant image" in pair_problems(flat, lab)[0]


def test_load_pair_raises_first_problem(tmp_path):
    img, lab = write_csiro_pair(tmp_path, "001", 0)
    write_nifti(lab, make_pair_arrays()[1][:, :, :4])
    from hipseg_lib.io import Pair
    with pytest.raises(HipsegError, match="differs from its image"):
        load_pair(Pair(VolumeId("001", 0), img, lab))


def test_save_nifti_atomic_refuses_existing(tmp_path):
    p = tmp_path / "x.nii.gz"
    save_nifti_atomic(np.zeros((4, 4, 4), np.uint8), LPS, p)
    with pytest.raises(HipsegError, match="already exists"):
        save_nifti_atomic(np.ones((4, 4, 4), np.uint8), LPS, p)
    save_nifti_atomic(np.ones((4, 4, 4), np.uint8), LPS, p, overwrite=True)
    assert load_volume(p, "label").array.max() == 1
    assert [f.name for f in tmp_path.iterdir()] == ["x.nii.gz"]
