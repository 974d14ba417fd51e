"""hipseg convert --to nnunet: nnU-Net v2's raw layout, the source's files and labels, hipseg's split."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from hipseg_lib import CLASS_NAMES, HipsegError
from hipseg_lib.cli import main
from hipseg_lib.convert import to_nnunet
from hipseg_lib.data import split_folder


def test_the_nnunet_dataset_holds_the_source_files_and_hipsegs_split(tiny_synth, tmp_path):
    out = tmp_path / "nnUNet_raw" / "Dataset501_HipMRI"
    counts = to_nnunet(tiny_synth, out)
    split = split_folder(tiny_synth, 0)
    assert counts == {k: len(v) for k, v in split.items()}
    # nnU-Net v2's raw format: the four keys it requires, background 0 and consecutive labels
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "T2"} and doc["file_ending"] == ".nii.gz"
    assert doc["labels"] == {name: i for i, name in enumerate(CLASS_NAMES)} and doc["labels"]["background"] == 0
    assert doc["numTraining"] == len(split["train"]) + len(split["val"])
    train_ids = {f"Case_{p.id}" for p in split["train"] + split["val"]}
    test_ids = {f"Case_{p.id}" for p in split["test"]}
    assert {f.name for f in (out / "imagesTr").iterdir()} == {f"{i}_0000.nii.gz" for i in train_ids}
    assert {f.name for f in (out / "labelsTr").iterdir()} == {f"{i}.nii.gz" for i in train_ids}
    assert {f.name for f in (out / "imagesTs").iterdir()} == {f"{i}_0000.nii.gz" for i in test_ids}
    assert {f.name for f in (out / "labelsTs").iterdir()} == {f"{i}.nii.gz" for i in test_ids}
    assert doc["numTraining"] == len(list((out / "imagesTr").iterdir()))
    # the files are the source's, byte for byte (the synthetic set is .nii.gz)
    for p in split["train"][:2] + split["test"][:1]:
        folder = "Tr" if p in split["train"] else "Ts"
        assert (out / f"images{folder}" / f"Case_{p.id}_0000.nii.gz").read_bytes() == p.image.read_bytes()
        assert (out / f"labels{folder}" / f"Case_{p.id}.nii.gz").read_bytes() == p.label.read_bytes()
    # fold 0 is hipseg's split, and no test case is in it
    folds = json.loads((out / "splits_final.json").read_text())
    assert folds == [{"train": [f"Case_{p.id}" for p in split["train"]],
                      "val": [f"Case_{p.id}" for p in split["val"]]}]
    assert not test_ids & set(folds[0]["train"] + folds[0]["val"])
    assert {i.split("_Week")[0] for i in test_ids}.isdisjoint({i.split("_Week")[0] for i in train_ids}), \
        "split by patient: no case has weeks on both sides"


def test_an_uncompressed_source_is_written_compressed_with_the_same_labels(tiny_synth, tmp_path):
    import shutil

    data = tmp_path / "plain"
    shutil.copytree(tiny_synth, data)
    first = sorted((data / "semantic_labels_anon").iterdir())[0]
    img = nib.load(first)
    truth = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image(truth, img.affine, img.header), first.with_name(first.name[:-3]))  # as .nii
    first.unlink()
    out = tmp_path / "Dataset502_Plain"
    to_nnunet(data, out)
    ident = "Case_" + first.name.split("Case_")[1].split("_SEMANTIC")[0]
    written = next(out.glob(f"labels*/{ident}.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(nib.load(written).dataobj), truth)


def test_existing_output_and_bad_names_are_refused(tiny_synth, tmp_path, capsys):
    out = tmp_path / "Dataset501_HipMRI"
    to_nnunet(tiny_synth, out)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert main(["convert", "--to", "nnunet", str(tiny_synth), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Dataset501_HipMRI: already exists" in err[0] and "--overwrite" in err[0]
    assert (out / "dataset.json").stat().st_mtime_ns == stamp, "untouched"
    assert main(["convert", "--to", "nnunet", str(tiny_synth), str(out), "--overwrite"]) == 0
    with pytest.raises(HipsegError, match="DatasetNNN_Name"):
        to_nnunet(tiny_synth, tmp_path / "hipmri_for_nnunet")


def test_a_label_on_another_grid_is_named_before_anything_is_written(tiny_synth, tmp_path):
    import shutil

    data = tmp_path / "bad"
    shutil.copytree(tiny_synth, data)
    label = sorted((data / "semantic_labels_anon").iterdir())[-1]
    write_nifti(label, np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(HipsegError, match=label.name):
        to_nnunet(data, tmp_path / "Dataset503_Bad")
    assert not (tmp_path / "Dataset503_Bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary folder left"
