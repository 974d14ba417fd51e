from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from hipseg_lib import HipsegError
from hipseg_lib.checkpoint import load_model, read_checkpoint, save_checkpoint
from hipseg_lib.io import find_pairs, load_volume
from hipseg_lib.model import ModelConfig, ResUNet3D
from hipseg_lib.evaluate import evaluate_folders
from hipseg_lib.predict import predict_array, predict_files, prediction_name, sliding_window_logits
from hipseg_lib.preprocess import Preprocessing



def test_predict_array_shape_and_orientation_round_trip(tiny_model, tiny_synth):
    model, prep, _, ckpt = load_model(tiny_model)
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    pred = predict_array(model, vol.array, vol.affine, prep)
    assert pred.shape == vol.shape and pred.dtype == np.uint8
    # The same scan stored in RAS order (x and y flipped) gets the same labels, flipped back.
    ras = vol.affine.copy()
    ras[:, 0] *= -1
    ras[:, 1] *= -1
    pred_ras = predict_array(model, vol.array[::-1, ::-1].copy(), ras, prep)
    np.testing.assert_array_equal(pred_ras, pred[::-1, ::-1])


def test_sliding_window_matches_whole_volume_shape(tiny_model, tiny_synth):
    model, prep, _, ckpt = load_model(tiny_model)
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    whole = predict_array(model, vol.array, vol.affine, prep)
    windows = predict_array(model, vol.array, vol.affine, prep, memory_bytes=1)
    assert windows.shape == whole.shape
    assert (windows == whole).mean() > 0.8
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        out = sliding_window_logits(model, x, (8, 8, 8))
    assert out.shape == (1, 6, 16, 16, 8)


def test_predict_files_writes_uint8_with_input_geometry(tiny_model, tiny_synth, tmp_path):
    pair = find_pairs(tiny_synth).pairs[0]
    out = tmp_path / "pred"
    written = predict_files(tiny_model, [pair.image], out, device="cpu", progress=False)
    assert [w.name for w in written] == [prediction_name(pair.image)]
    src, res = nib.load(pair.image), nib.load(written[0])
    assert res.shape == src.shape and np.allclose(res.affine, src.affine)
    assert res.get_data_dtype() == np.uint8
    with pytest.raises(HipsegError, match="already exists"):
        predict_files(tiny_model, [pair.image], out, device="cpu", progress=False)
    predict_files(tiny_model, [pair.image], out, device="cpu", overwrite=True, progress=False)


def test_predict_any_dtype_and_big_endian(tiny_model, tiny_synth, tmp_path):
    """The same scan stored big-endian gets the same labels as in native byte order, and the label
    map keeps the input's header: geometry codes, voxel size, units, description."""
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    arr = np.rint(vol.array).astype(np.int16)
    paths = {}
    for order in ("<", ">"):
        img = nib.Nifti1Image(arr.astype(order + "i2"), vol.affine, header=nib.Nifti1Header(endianness=order))
        img.header.set_qform(vol.affine, code=1)
        img.header.set_sform(vol.affine, code=2)
        img.header.set_xyzt_units("mm", "sec")
        img.header["descrip"] = b"scanner 7, protocol T2"
        paths[order] = tmp_path / f"scan_{'be' if order == '>' else 'le'}.nii"
        nib.save(img, paths[order])
    assert nib.load(paths[">"]).header.endianness == ">"
    out = {o: predict_files(tiny_model, [p], tmp_path / f"o{i}", device="cpu", progress=False)[0]
           for i, (o, p) in enumerate(paths.items())}
    labels = {o: np.asanyarray(nib.load(f).dataobj) for o, f in out.items()}
    assert labels[">"].shape == vol.shape and np.array_equal(labels[">"], labels["<"])
    src, got = nib.load(paths[">"]).header, nib.load(out[">"]).header
    assert got.get_data_dtype().kind == "u" and got.get_data_dtype().itemsize == 1
    assert int(got["qform_code"]) == 1 and int(got["sform_code"]) == 2
    assert got.get_zooms() == src.get_zooms() and got.get_xyzt_units() == ("mm", "sec")
    assert bytes(got["descrip"]).rstrip(b"\0") == b"scanner 7, protocol T2"
    np.testing.assert_allclose(nib.load(out[">"]).affine, vol.affine)


def test_checkpoint_refusals(tiny_model, tmp_path):
    with pytest.raises(HipsegError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "none.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(HipsegError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(junk)
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(HipsegError, match="not a hipseg checkpoint"):
        read_checkpoint(plain)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.pth"
    torch.save({"format": "hipseg-checkpoint-v1", "x": Evil()}, evil)
    with pytest.raises(HipsegError, match="refused to load"):
        read_checkpoint(evil)
    # Another architecture, and another number of classes.
    ck = read_checkpoint(tiny_model)
    other = tmp_path / "other.pth"
    state = ResUNet3D(ModelConfig(base_channels=8, depth=3)).state_dict()
    torch.save({**ck, "model_state": state}, other)
    with pytest.raises(HipsegError, match="weights do not fit"):
        load_model(other)
    seven = tmp_path / "seven.pth"
    save_checkpoint(seven, ResUNet3D(ModelConfig(base_channels=4, depth=3, num_classes=7)),
                    ModelConfig(base_channels=4, depth=3, num_classes=7), Preprocessing((16, 16, 8)))
    with pytest.raises(HipsegError, match="predicts 7 classes, expected 6"):
        load_model(seven, expect_classes=6)


def test_evaluate_folders_pairs_by_name(tiny_model, tiny_synth, tmp_path):
    pairs = find_pairs(tiny_synth).pairs[:2]
    predict_files(tiny_model, [p.image for p in pairs], tmp_path / "pred", device="cpu", progress=False)
    truth = tmp_path / "truth"
    truth.mkdir()
    for p in pairs:
        (truth / p.label.name).write_bytes(p.label.read_bytes())
    doc = evaluate_folders(tmp_path / "pred", truth)
    assert len(doc["cases"]) == 2 and doc["unmatched"] == [] and doc["truths_without_prediction"] == []
    stray = tmp_path / "pred" / "Case_999_Week0_LFOV_pred.nii.gz"
    stray.write_bytes(next((tmp_path / "pred").iterdir()).read_bytes())
    assert evaluate_folders(tmp_path / "pred", truth)["unmatched"] == [str(stray)]
    stray.unlink()
    assert set(doc["cases"][0]["metrics"]) == {"dice", "iou", "hd95", "asd"}
    assert doc["summary"]["dice"]["background"]["n"] == 2
    # A perfect prediction scores 1.0 and 0 mm.
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for p in pairs:
        (perfect / p.label.name.replace("_SEMANTIC", "")).write_bytes(p.label.read_bytes())
    doc = evaluate_folders(perfect, truth)
    assert doc["summary"]["dice"]["body"]["mean"] == 1.0 and doc["summary"]["hd95"]["body"]["mean"] == 0.0


def test_a_patch_trained_network_validates_and_predicts_in_windows(tiny_synth, tmp_path, monkeypatch):
    """Trained on 8x8x8 patches of a 16x16x8 grid, the network is validated during training and
    run by ``predict_files`` in sliding windows of that patch size, never on the whole grid."""
    import hipseg_lib.predict as P
    from hipseg_lib.config import make_config
    from hipseg_lib.train import train

    windows = []
    real = P.sliding_window_logits

    def spy(model, x, patch, *args, **kwargs):
        windows.append((tuple(patch), tuple(x.shape[2:])))
        return real(model, x, patch, *args, **kwargs)

    monkeypatch.setattr(P, "sliding_window_logits", spy)
    cfg = make_config("smoke", target_shape=(16, 16, 8), patch_shape=(8, 8, 8), base_channels=4, depth=2,
                      epochs=1, amp="off", cache_dir=str(tmp_path / "cache"))
    train(cfg, tiny_synth, tmp_path / "m", progress=False, log=lambda s: None)
    from hipseg_lib.data import split_folder
    n_val = len(split_folder(tiny_synth, cfg.split_seed)["val"])
    assert n_val > 0 and len(windows) == n_val, "the one validation ran every volume in windows"
    assert set(windows) == {((8, 8, 8), (16, 16, 8))}

    windows.clear()
    loaded = load_model(tmp_path / "m" / "new_model.pth")
    assert loaded.window == (8, 8, 8) and not hasattr(loaded.network, "inference_patch")
    image = find_pairs(tiny_synth).pairs[0].image
    written = predict_files(tmp_path / "m" / "new_model.pth", [image], tmp_path / "out", tta=False)
    assert len(written) == 1 and nib.load(written[0]).shape == load_volume(image).shape
    assert windows == [((8, 8, 8), (16, 16, 8))], "prediction ran in windows of the patch size"


def test_a_model_trained_on_a_planned_spacing_predicts_on_each_scans_own_grid(tiny_synth, tmp_path):
    """resample="spacing": training plans the grid's voxel size from the training scans and stores it
    in the checkpoint; prediction resamples each scan to it and back, to the scan's own shape, in
    either orientation, and the torch-free numpy path puts it back the same way."""
    from hipseg_lib.config import make_config
    from hipseg_lib.data import plan_target_spacing, split_folder
    from hipseg_lib.predict import predict_probabilities
    from hipseg_lib.train import train

    cfg = make_config("smoke", target_shape=(32, 32, 16), base_channels=4, depth=3, epochs=1, amp="off",
                      resample="spacing")
    r = train(cfg, tiny_synth, tmp_path / "m", progress=False, log=lambda s: None)
    model, prep, _, ckpt = load_model(r.best_path)
    planned = plan_target_spacing(split_folder(tiny_synth)["train"], cfg.preprocessing)
    assert prep.resample == "spacing" and prep.target_spacing == planned
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    probs = predict_probabilities(model, vol.array, vol.affine, prep)
    assert probs.shape == (6, *vol.shape) and np.allclose(probs.sum(0), 1, atol=1e-4)
    pred = predict_array(model, vol.array, vol.affine, prep)
    ras = vol.affine.copy()
    ras[:, 0] *= -1
    ras[:, 1] *= -1
    np.testing.assert_array_equal(predict_array(model, vol.array[::-1, ::-1].copy(), ras, prep),
                                  pred[::-1, ::-1])
