"""hipseg export (ONNX, TorchScript) and hipseg predict --model x.onnx (ONNX Runtime, no torch)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hipseg_lib import CLASS_NAMES, HipsegError
from hipseg_lib.checkpoint import load_model, load_predictor, save_checkpoint
from hipseg_lib.config import make_config
from hipseg_lib.io import find_pairs, load_volume
from hipseg_lib.model import ResUNet3D
from hipseg_lib.predict import EXPORT_FORMAT, onnx_predictor, predict_files
from hipseg_lib.preprocess import Preprocessing, preprocess_image
from hipseg_lib.train import inference_settings

ROOT = Path(__file__).resolve().parents[1]
ort = pytest.importorskip("onnxruntime")


def _checkpoint(tmp_path: Path, preset: str) -> Path:
    """The preset's network (random weights, seed 0) in a checkpoint."""
    cfg = make_config(preset)
    torch.manual_seed(0)
    net = ResUNet3D(cfg.model).eval()
    return save_checkpoint(tmp_path / f"{preset}.pth", net, cfg.preprocessing, inference_settings(cfg), epoch=0)


def _scan_input(prep: Preprocessing, seed: int) -> torch.Tensor:
    from hipseg_lib.synth import SynthSpec, make_case_anatomy, render_volume

    rng = np.random.default_rng(seed)
    spec = SynthSpec(shape=(96, 96, 48), spacing=(2.0, 2.0, 3.0))
    image, _ = render_volume(make_case_anatomy(rng), spec, rng)
    return torch.from_numpy(preprocess_image(image, prep)[0])[None, None]


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_onnx_and_torchscript_give_pytorchs_logits_and_labels(tmp_path, preset):
    from hipseg_lib.export import export_model

    ckpt = _checkpoint(tmp_path, preset)
    model, prep, _, saved = load_model(ckpt)
    x = _scan_input(prep, seed=5)  # not the scan the export checked itself on
    with torch.no_grad():
        ref = model(x).numpy()
    onnx_file, onnx_json = export_model(ckpt, "onnx", tmp_path / "out")
    ts_file, ts_json = export_model(ckpt, "torchscript", tmp_path / "out")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = {"onnx": session.run(None, {"image": x.numpy()})[0],
           "torchscript": torch.jit.load(str(ts_file))(x).detach().numpy()}
    for name, out in got.items():
        assert out.shape == ref.shape, name
        assert float(np.abs(out - ref).max()) <= 1e-4, name
        # the same labels, but where PyTorch's top two logits are within that tolerance (a tie)
        top_two = np.sort(ref, axis=1)[:, -2:]
        tied = top_two[:, 1] - top_two[:, 0] <= 2e-4
        differ = out.argmax(1) != ref.argmax(1)
        assert not (differ & ~tied).any() and differ.sum() <= 3, (name, int(differ.sum()))
    meta = json.loads(onnx_json.read_text())
    assert meta["model_file"] == onnx_file.name and meta["opset"] == 17
    assert meta["class_names"] == list(CLASS_NAMES) and meta["class_indices"]["prostate"] == 5
    assert meta["preprocessing"] == prep.to_dict() and meta["input"]["grid"] == list(prep.target_shape)
    assert meta["input"]["divisible_by"] == model.divisor
    # The export's own check scan: labels equal but at ties (top-two logits closer than twice the
    # difference; the cpu network has one such voxel on today's scan), a handful at most.
    for r in meta["checked_against_pytorch"]:
        voxels = int(np.prod(r["input"]))
        assert r["labels_equal"] == (r["labels_differing_at_ties"] == 0)
        assert r["labels_differing_at_ties"] <= r["tied_voxels"] <= voxels // 10000
    assert all(r["max_abs_logit_difference"] <= 1e-4 for r in meta["checked_against_pytorch"])
    assert json.loads(ts_json.read_text())["model_format"] == "torchscript"


def test_an_export_that_fails_its_check_writes_nothing(tmp_path, monkeypatch):
    import hipseg_lib.export as E

    ckpt = _checkpoint(tmp_path, "smoke")
    monkeypatch.setattr(E, "TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(HipsegError, match="differs from PyTorch"):
        E.export_model(ckpt, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_keeps_existing_files(tmp_path):
    from hipseg_lib.export import export_model

    ckpt = _checkpoint(tmp_path, "smoke")
    model_file, _ = export_model(ckpt, "onnx", tmp_path / "out")
    stamp = model_file.stat().st_mtime_ns
    with pytest.raises(HipsegError, match="already exists"):
        export_model(ckpt, "onnx", tmp_path / "out")
    assert model_file.stat().st_mtime_ns == stamp
    export_model(ckpt, "onnx", tmp_path / "out", overwrite=True)


def _run_without_torch(*args: str) -> subprocess.CompletedProcess:
    """``hipseg ARGS`` in a process where ``import torch`` fails, as on a PC without PyTorch."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from hipseg_lib.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m]), "
            "'torch was imported'\n"
            "sys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)


def test_predict_with_the_onnx_model_writes_the_checkpoints_labels_without_torch(tiny_model, tiny_synth,
                                                                              tmp_path):
    from hipseg_lib.export import export_model

    onnx_file, _ = export_model(tiny_model, "onnx", tmp_path / "exported")
    images = [p.image for p in find_pairs(tiny_synth).pairs[:3]]
    r = _run_without_torch("predict", "--model", str(onnx_file), *map(str, images), "--out",
                           str(tmp_path / "onnx"), "--quiet", "--probabilities")
    assert r.returncode == 0, r.stderr
    ref = predict_files(load_predictor(tiny_model, "cpu"), images, tmp_path / "torch", progress=False,
                        probabilities=True)
    for path in ref:
        mine = nib.load(tmp_path / "onnx" / path.name)
        theirs = nib.load(path)
        np.testing.assert_array_equal(np.asanyarray(mine.dataobj), np.asanyarray(theirs.dataobj))
        np.testing.assert_array_equal(mine.affine, theirs.affine)
        assert mine.header.get_data_dtype() == np.uint8
        probs = [np.asarray(nib.load(p.parent / p.name.replace("_pred", "_probs")).dataobj, np.float32)
                 for p in (tmp_path / "onnx" / path.name, path)]
        assert float(np.abs(probs[0] - probs[1]).max()) <= 2e-4  # two steps of the uint16 scale
    # a verb that needs PyTorch says so in one line, whatever flags it was given
    r = _run_without_torch("train", "--data", str(tiny_synth), "--epochs", "3")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "hipseg: error: hipseg train needs PyTorch, which is not installed here "
        "(an exported .onnx model predicts without it)"], r.stderr


@pytest.mark.parametrize("window", [None, (8, 8, 4)])
def test_onnx_and_pytorch_predict_alike_with_the_checkpoints_settings(tiny_model, tiny_synth, tmp_path, window):
    """One predictor pipeline, two backends: the export carries the checkpoint's inference settings
    (the axes its training mirrored), and both give the same probabilities, whole or in windows."""
    from hipseg_lib.export import export_model

    onnx_file, _ = export_model(tiny_model, "onnx", tmp_path / "exported")
    torch_predictor = load_predictor(tiny_model, "cpu", window=window)
    exported = onnx_predictor(onnx_file, window=window)
    assert exported.settings == torch_predictor.settings and exported.settings.mirror_axes == (0,)
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    ref = torch_predictor.probabilities(vol.array, vol.affine)
    got = exported.probabilities(vol.array, vol.affine)
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-4
    np.testing.assert_array_equal(exported.labels(vol.array, vol.affine), torch_predictor.labels(vol.array, vol.affine))


def test_bad_model_files_are_one_line_errors(tmp_path, tiny_synth):
    image = str(find_pairs(tiny_synth).pairs[0].image)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    cases = [(tmp_path / "none.onnx", "no such model file"), (junk, "no junk.json beside it")]
    for model, needle in cases:
        r = _run_without_torch("predict", "--model", str(model), image, "--out", str(tmp_path / "o"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and str(model.name) in lines[0] and needle in lines[0], r.stderr
    (tmp_path / "junk.json").write_text(json.dumps({"format": EXPORT_FORMAT, "model_format": "onnx",
                                                     "preprocessing": {"target_shape": [16, 16, 8]},
                                                     "input": {"divisible_by": 4},
                                                     "inference": {"window": None, "mirror_axes": [0]},
                                                     "trained_mirror_axes": [0],
                                                     "class_names": list(CLASS_NAMES)}))
    r = _run_without_torch("predict", "--model", str(junk), image, "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "junk.onnx: not a loadable ONNX model" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_tta_mirrors_along_the_trained_axes_whatever_the_checkpoint_stores(tiny_model, tiny_synth, tmp_path):
    """Chapter 5 may store "no mirroring" in a checkpoint; `--tta` then mirrors along the axes the
    network trained with (kept in the checkpoint and in its export), `--no-tta` never mirrors, and
    no flag does what the checkpoint says."""
    import shutil

    from hipseg_lib.checkpoint import store_inference
    from hipseg_lib.cli import main
    from hipseg_lib.export import export_model

    ckpt = shutil.copy(tiny_model, tmp_path / "plain.pth")
    trained = load_predictor(ckpt, "cpu").settings.mirror_axes
    assert trained == (0,)  # the smoke preset's augmentation mirrors left-right
    store_inference(ckpt, load_predictor(ckpt, "cpu", mirror_axes=()).settings)
    assert load_predictor(ckpt, "cpu").settings.mirror_axes == ()
    assert load_predictor(ckpt, "cpu", tta=True).settings.mirror_axes == trained
    assert load_predictor(ckpt, "cpu", tta=False, mirror_axes=(0, 1)).settings.mirror_axes == ()
    onnx_file, _ = export_model(ckpt, "onnx", tmp_path / "exported")
    assert onnx_predictor(onnx_file).settings.mirror_axes == ()
    assert onnx_predictor(onnx_file, tta=True).settings.mirror_axes == trained
    image = find_pairs(tiny_synth).pairs[0].image
    for flags, tta in (([], False), (["--tta"], True), (["--no-tta"], False)):
        out = tmp_path / f"cli{len(flags)}{tta}"
        assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(out), "--quiet",
                     "--probabilities", *flags]) == 0
        ref = predict_files(load_predictor(ckpt, "cpu", tta=tta), [image], tmp_path / f"ref{tta}",
                            progress=False, probabilities=True, overwrite=True)[0]
        probs = ref.name.replace("_pred", "_probs")
        np.testing.assert_array_equal(np.asarray(nib.load(out / probs).dataobj),
                                      np.asarray(nib.load(ref.parent / probs).dataobj))
    plain, mirrored = (np.asarray(nib.load(tmp_path / d / probs).dataobj) for d in ("refFalse", "refTrue"))
    assert not np.array_equal(plain, mirrored)  # the flag changes what is written
