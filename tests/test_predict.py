from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from hipseg_lib import HipsegError
from hipseg_lib.checkpoint import load_model, load_predictor, read_checkpoint
from hipseg_lib.folders import evaluate_folders
from hipseg_lib.io import find_pairs, load_volume
from hipseg_lib.model import ModelConfig, ResUNet3D
from hipseg_lib.predict import predict_files, prediction_name


def test_labels_keep_the_scans_shape_and_follow_its_orientation(tiny_model, tiny_synth):
    predictor = load_predictor(tiny_model, "cpu")
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    pred = predictor.labels(vol.array, vol.affine)
    assert pred.shape == vol.shape and pred.dtype == np.uint8
    # The same scan stored in RAS order (x and y flipped) gets the same labels, flipped back.
    ras = vol.affine.copy()
    ras[:, 0] *= -1
    ras[:, 1] *= -1
    pred_ras = predictor.labels(vol.array[::-1, ::-1].copy(), ras)
    np.testing.assert_array_equal(pred_ras, pred[::-1, ::-1])


def test_sliding_windows_give_the_whole_volumes_labels_mostly(tiny_model, tiny_synth):
    predictor = load_predictor(tiny_model, "cpu")
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    whole = predictor.labels(vol.array, vol.affine)
    windows = predictor.replace(window=(16, 16, 8)).labels(vol.array, vol.affine)
    assert windows.shape == whole.shape
    assert (windows == whole).mean() > 0.8


def test_predict_files_writes_uint8_with_input_geometry(tiny_model, tiny_synth, tmp_path):
    pair = find_pairs(tiny_synth).pairs[0]
    out = tmp_path / "pred"
    predictor = load_predictor(tiny_model, "cpu")
    written = predict_files(predictor, [pair.image], out, progress=False)
    assert [w.name for w in written] == [prediction_name(pair.image)]
    src, res = nib.load(pair.image), nib.load(written[0])
    assert res.shape == src.shape and np.allclose(res.affine, src.affine)
    assert res.get_data_dtype() == np.uint8
    with pytest.raises(HipsegError, match="already exists"):
        predict_files(predictor, [pair.image], out, progress=False)
    predict_files(predictor, [pair.image], out, overwrite=True, progress=False)
    assert [f.name for f in out.iterdir()] == [written[0].name], "no staging folder left behind"


def test_a_bad_input_among_good_ones_writes_nothing(tiny_model, tiny_synth, tmp_path):
    """All or nothing: the third of three inputs is truncated; no label map is written."""
    pairs = find_pairs(tiny_synth).pairs[:3]
    bad = tmp_path / "in" / "Case_999_Week0_LFOV.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(pairs[0].image.read_bytes()[:400])
    out = tmp_path / "out"
    with pytest.raises(HipsegError, match="Case_999_Week0_LFOV.nii.gz"):
        predict_files(load_predictor(tiny_model, "cpu"), [p.image for p in pairs[:2]] + [bad], out, progress=False)
    assert list(out.iterdir()) == []


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
    predictor = load_predictor(tiny_model, "cpu")
    out = {o: predict_files(predictor, [p], tmp_path / f"o{i}", progress=False)[0]
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
    # Weights of another architecture.
    ck = read_checkpoint(tiny_model)
    other = tmp_path / "other.pth"
    state = ResUNet3D(ModelConfig(base_channels=8, depth=3)).state_dict()
    torch.save({**ck, "model_state": state}, other)
    with pytest.raises(HipsegError, match="does not hold a network of its stated settings"):
        load_model(other)


def test_evaluate_folders_pairs_by_name(tiny_model, tiny_synth, tmp_path):
    pairs = find_pairs(tiny_synth).pairs[:2]
    predict_files(load_predictor(tiny_model, "cpu"), [p.image for p in pairs], tmp_path / "pred", progress=False)
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
    assert set(doc["cases"][0]["metrics"]) == {"dice", "iou", "hd95", "asd", "nsd"}
    assert doc["summary"]["dice"]["background"]["n"] == 2
    assert set(doc["per_patient"]["dice"]) == {"body", "bones", "bladder", "rectum", "prostate"}
    assert set(doc["per_patient"]["dice"]["body"]["patients"]) == {p.id.case for p in pairs}
    # A perfect prediction scores 1.0 and 0 mm.
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for p in pairs:
        (perfect / p.label.name.replace("_SEMANTIC", "")).write_bytes(p.label.read_bytes())
    doc = evaluate_folders(perfect, truth)
    assert doc["summary"]["dice"]["body"]["mean"] == 1.0 and doc["summary"]["hd95"]["body"]["mean"] == 0.0


def test_a_patch_trained_network_validates_and_predicts_in_windows(tiny_synth, tmp_path, monkeypatch):
    """Trained on 8x8x8 patches of a 16x16x8 grid, the network is validated during training and
    run by ``hipseg predict``'s predictor in sliding windows of that patch size, never on the whole
    grid: every input the network sees is one patch."""
    import hipseg_lib.checkpoint as C
    from hipseg_lib.config import make_config
    from hipseg_lib.predictor import plan_windows
    from hipseg_lib.train import fit, prepare_data

    seen = []
    real = C.TorchBackend.__call__
    monkeypatch.setattr(C.TorchBackend, "__call__", lambda self, x: seen.append(tuple(x.shape[2:])) or real(self, x))
    cfg = make_config("smoke", target_shape=(16, 16, 8), patch_shape=(8, 8, 8), base_channels=4, depth=2, epochs=1)
    data = prepare_data(cfg, tiny_synth, tmp_path / "cache", torch.device("cpu"))
    fit(cfg, data, tmp_path / "m", torch.device("cpu"), "fp32", log=lambda s: None)
    per_volume = len(plan_windows((16, 16, 8), (8, 8, 8)))  # 3 x 3 x 1 overlapping by half
    assert per_volume == 9 and len(seen) == per_volume * len(data.validation) > 0
    assert set(seen) == {(8, 8, 8)}
    seen.clear()
    predictor = load_predictor(tmp_path / "m" / "new_model.pth", "cpu", mirror_axes=())
    assert predictor.settings.window == (8, 8, 8)
    image = find_pairs(tiny_synth).pairs[0].image
    written = predict_files(predictor, [image], tmp_path / "out")
    assert len(written) == 1 and nib.load(written[0]).shape == load_volume(image).shape
    assert seen and set(seen) == {(8, 8, 8)}, "prediction ran in windows of the patch size"


def test_the_torch_backend_predicts_in_fp32_on_a_cpu_and_refuses_fp16():
    """"auto" means fp32 on any CPU (every CPU predicts the same labels); fp16 is refused, never
    silently replaced."""
    from hipseg_lib import SettingsError
    from hipseg_lib.checkpoint import TorchBackend

    net = ResUNet3D(ModelConfig(base_channels=2, depth=2))
    assert TorchBackend(net, "cpu").dtype is None
    assert TorchBackend(net, "cpu", "bf16").dtype is torch.bfloat16
    with pytest.raises(SettingsError, match="bf16 or fp32, not fp16"):
        TorchBackend(net, "cpu", "fp16")


def test_tensors_stay_tensors_through_windows_and_mirroring_and_match_numpy(tiny_model):
    """Given a tensor, the predictor computes on tensors where they are (what lets a GPU validate
    without copying scores back): windows blended and mirrored copies averaged as the numpy path
    does them, to float32 rounding."""
    predictor = load_predictor(tiny_model, "cpu").replace(window=(16, 16, 8), overlap=0.5,
                                                          mirror_axes=(0, 2))
    x = np.random.default_rng(0).normal(size=(1, 1, 24, 20, 12)).astype(np.float32)
    on_numpy = predictor.grid_log_probabilities(x)
    on_tensors = predictor.grid_log_probabilities(torch.from_numpy(x))
    assert isinstance(on_numpy, np.ndarray) and on_numpy.dtype == np.float32
    assert torch.is_tensor(on_tensors) and on_tensors.dtype == torch.float32
    np.testing.assert_allclose(on_tensors.numpy(), on_numpy, atol=1e-4)


def test_validation_runs_on_tensors_and_scores_as_dice_per_class(tiny_model, tiny_synth, tmp_path, monkeypatch):
    """``validate`` hands the network tensors on the run's device (never numpy, which would bring
    every score to the host), and its Dice and loss are those of the numpy path."""
    import hipseg_lib.checkpoint as C
    from hipseg_lib.config import make_config
    from hipseg_lib.metrics import dice_per_class
    from hipseg_lib.train import make_loss, prepare_data, validate

    cfg = make_config("smoke", target_shape=(16, 16, 8), base_channels=4, depth=3)  # as tiny_model's
    volumes = prepare_data(cfg, tiny_synth, tmp_path / "cache", torch.device("cpu")).validation
    predictor = load_predictor(tiny_model, "cpu", mirror_axes=(0,))
    loss_fn = make_loss(cfg)
    kinds = []
    real = C.TorchBackend.__call__
    monkeypatch.setattr(C.TorchBackend, "__call__", lambda self, x: kinds.append(type(x)) or real(self, x))
    dice, losses = validate(predictor, volumes, loss_fn, "cpu")
    assert kinds and set(kinds) == {torch.Tensor}
    none = validate(predictor, [], loss_fn, "cpu")  # a process of several with no validation volume
    assert none[0].shape == (0, dice.shape[1]) and none[1].shape == (0,)
    for (image, label), row, loss in zip(volumes, dice, losses):
        logp = predictor.grid_log_probabilities(image[None, None])
        np.testing.assert_allclose(row, dice_per_class(logp[0].argmax(0), label), atol=1e-6)
        truth = torch.from_numpy(label[None].astype(np.int64))
        assert loss == pytest.approx(float(loss_fn(torch.from_numpy(logp), truth)), abs=1e-4)
