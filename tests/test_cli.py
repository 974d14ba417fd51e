"""The command line: every verb has --help; bad input gives one line, exit 1, no traceback, no output file."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pair_arrays, write_csiro_pair, write_nifti

from hipseg_lib.cli import main

VERBS = ["synth", "check", "train", "predict", "export", "convert", "evaluate", "book"]


def run_cli(*args, cwd=None, env=None, process=False):
    """``hipseg ARGS``: its exit status, stdout and stderr.

    In this process (``main(ARGS)``; a torch import spared per call) unless ``process`` or a
    ``cwd`` or ``env`` is given: then ``python -m hipseg_lib ARGS`` in its own process, where
    ``env`` adds variables (None removes one). An unexpected exception raises here either way
    (a traceback in the child's stderr, or the exception itself), so both fail a test alike."""
    if process or cwd is not None or env is not None:
        full = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        return subprocess.run([sys.executable, "-m", "hipseg_lib", *map(str, args)], capture_output=True,
                              text=True, cwd=cwd, env=full)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("verb", VERBS)
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert verb in capsys.readouterr().out


def test_console_script_installed():
    exe = Path(sys.executable).with_name("hipseg")
    assert exe.exists()
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("hipseg ")


def _one_line_error(r, *needles):
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hipseg: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_synth_and_check_round_trip(tmp_path):
    out = tmp_path / "s"
    r = run_cli("synth", "--out", out, "--cases", 3, "--shape", "24x24x16", "--max-weeks", 2, "--workers", 1)
    assert r.returncode == 0 and "image/label pairs of 3 cases" in r.stdout and not r.stderr
    old = run_cli("synth", "--out", tmp_path / "old", "--cases", 3, "--shape", 24, 24, 16)
    assert old.returncode == 2 and "expected three sizes like 64x64x32" in old.stderr, "one shape syntax: XxYxZ"
    r = run_cli("check", out, "--quiet")
    assert r.returncode == 0 and "no problems found" in r.stdout and "LPS" in r.stdout
    r = run_cli("synth", "--out", out, "--cases", 3)
    _one_line_error(r, str(out), "already exists")


def test_check_reports_every_problem_and_exits_nonzero(tmp_path):
    root = tmp_path / "d"
    write_csiro_pair(root, "001", 0)
    img, lab = write_csiro_pair(root, "002", 0)
    write_nifti(lab, make_pair_arrays()[1][:, :, :5])  # shape mismatch
    _, lab3 = write_csiro_pair(root, "003", 0)
    bad = make_pair_arrays()[1].astype(np.int16)
    bad[0, 0, 0] = 9
    write_nifti(lab3, bad)
    write_nifti(root / "semantic_MRs_anon" / "Case_004_Week0_LFOV.nii.gz", np.ones((4, 4, 4)))
    r = run_cli("check", root, "--quiet")
    assert r.returncode == 1
    assert "Case_002_Week0_SEMANTIC_LFOV.nii.gz: shape (16, 16, 5) differs from its image (16, 16, 8)" in r.stdout
    assert "label values 9 outside 0..5" in r.stdout
    assert "Case_004_Week0_LFOV.nii.gz: no matching label file" in r.stdout
    assert "3 problem(s)" in r.stdout


def _data(tmp_path, n_cases=3):
    root = tmp_path / "data"
    for c in range(n_cases):
        write_csiro_pair(root, f"{c:03d}", 0, seed=c)
    return root


@pytest.mark.parametrize("setup, needles", [
    (lambda d: d / "missing", ["missing", "no such folder"]),
    (lambda d: (d / "empty").mkdir() or d / "empty", ["no .nii or .nii.gz files"]),
    (lambda d: _data(d, 2), ["too few patients to split: 2 found"]),
])
def test_train_bad_data(tmp_path, setup, needles):
    data = setup(tmp_path)
    r = run_cli("train", "--preset", "smoke", "--data", data, "--out", tmp_path / "m", "--quiet")
    _one_line_error(r, *needles)
    assert not (tmp_path / "m" / "new_model.pth").exists()


def test_train_bad_volume_named(tmp_path):
    data = _data(tmp_path)
    img = data / "semantic_MRs_anon" / "Case_001_Week0_LFOV.nii.gz"
    write_nifti(img, np.full((16, 16, 8), np.nan, np.float32))
    r = run_cli("train", "--preset", "smoke", "--data", data, "--out", tmp_path / "m", "--quiet")
    _one_line_error(r, "Case_001_Week0_LFOV.nii.gz", "NaN or infinite")


def test_train_cli_config_and_overrides(tmp_path, tiny_synth):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 1, "base_channels": 4, "depth": 3}))
    r = run_cli("train", "--preset", "smoke", "--data", tiny_synth, "--out", tmp_path / "m", "--config", cfg,
                "--target-shape", "16x16x8", "--precision", "fp32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "new_model.pth").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    _one_line_error(run_cli("train", "--data", tiny_synth, "--config", bad), "bad.json", "not valid JSON")
    _one_line_error(run_cli("train", "--data", tiny_synth, "--set", "colour=1"), "unknown setting: colour")
    _one_line_error(run_cli("train", "--data", tiny_synth, "--fold", "5"), "fold must be 0 to folds - 1")


def test_train_override_order_is_preset_config_flags_set(tmp_path):
    from hipseg_lib.cli import build_parser, train_config_of

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 3, "lr": 0.1, "depth": 4, "batch_size": 5}))

    def parse(*extra):
        return train_config_of(build_parser().parse_args(["train", "--preset", "cpu", *map(str, extra)]))

    from hipseg_lib.config import make_config

    assert parse() == make_config("cpu"), "no flags: the preset itself"
    c = parse("--config", cfg)
    assert (c.epochs, c.lr, c.model.depth, c.batch_size) == (3, 0.1, 4, 5), "--config over the preset"
    c = parse("--config", cfg, "--epochs", 4, "--depth", 5)
    assert (c.epochs, c.lr, c.model.depth) == (4, 0.1, 5), "flags over --config"
    c = parse("--config", cfg, "--epochs", 4, "--set", "epochs=6", "--set", "target_shape=[32,32,16]")
    assert (c.epochs, c.lr, c.preprocessing.target_shape, c.batch_size) == (6, 0.1, (32, 32, 16), 5), \
        "--set over flags"
    c = parse("--fold", 2, "--folds", 3)
    assert (c.fold, c.folds) == (2, 3), "cross-validation's fold has a flag"
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as ended:
        main(["train", "--help"])
    assert ended.value.code == 0
    assert "--config, then the dedicated flags" in " ".join(help_text.getvalue().split())


@pytest.mark.parametrize("make, needles", [
    (lambda d: d / "nope.nii.gz", ["nope.nii.gz", "no such file"]),
    (lambda d: _write(d / "notes.txt", b"hello"), ["notes.txt", "not a NIfTI file"]),
    (lambda d: _truncated(d), ["trunc.nii.gz", "truncated or corrupt"]),
    (lambda d: write_nifti(d / "flat.nii.gz", np.ones((16, 16))), ["flat.nii.gz", "expected a 3D volume"]),
    (lambda d: write_nifti(d / "four.nii.gz", np.ones((16, 16, 8, 3))), ["four.nii.gz", "expected a 3D volume"]),
    (lambda d: write_nifti(d / "inf.nii.gz", np.full((16, 16, 8), np.inf, np.float32)),
     ["inf.nii.gz", "NaN or infinite"]),
    (lambda d: write_nifti(d / "const.nii.gz", np.full((16, 16, 8), 7, np.float32)),
     ["const.nii.gz", "constant image"]),
    (lambda d: (d / "emptydir").mkdir() or d / "emptydir", ["emptydir", "holds no .nii"]),
])
def test_predict_bad_inputs(tiny_model, tmp_path, make, needles):
    inp = make(tmp_path)
    out = tmp_path / "out"
    r = run_cli("predict", "--checkpoint", tiny_model, inp, "--out", out, "--device", "cpu")
    _one_line_error(r, *needles)
    assert not out.exists() or not any(out.iterdir()), "no partial output"


def test_a_bad_input_in_a_real_process_is_one_line_and_exit_1(tiny_model, tmp_path):
    """The cases above run in this process; one of them again as the user runs it."""
    out = tmp_path / "out"
    r = run_cli("predict", "--checkpoint", tiny_model, _truncated(tmp_path), "--out", out, "--device", "cpu",
                process=True)
    _one_line_error(r, "trunc.nii.gz", "truncated or corrupt")
    assert not out.exists() or not any(out.iterdir())


def test_predict_writes_nothing_when_any_input_is_bad(tiny_model, tiny_synth, tmp_path):
    """Good scans first, bad ones last in the folder's order: the run stops naming the first bad
    file and writes no label map at all (not the good ones before it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for img in sorted((tiny_synth / "semantic_MRs_anon").iterdir())[:2]:
        shutil.copy(img, folder / img.name)
    image, _ = make_pair_arrays((32, 32, 16))
    bad = write_nifti(folder / "zz_trunc.nii.gz", image)
    bad.write_bytes(bad.read_bytes()[:2000])
    write_nifti(folder / "zz_zconst.nii.gz", np.full((16, 16, 8), 7, np.float32))
    out = tmp_path / "out"
    r = run_cli("predict", "--checkpoint", tiny_model, folder, "--out", out, "--device", "cpu")
    _one_line_error(r, "zz_trunc.nii.gz", "truncated or corrupt", "nothing was written")
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def _write(p, data):
    p.write_bytes(data)
    return p


def _truncated(d):
    image, _ = make_pair_arrays((32, 32, 16))
    p = write_nifti(d / "trunc.nii.gz", image)
    p.write_bytes(p.read_bytes()[:2000])
    return p


def test_predict_bad_checkpoints_and_outputs(tiny_model, tiny_synth, tmp_path):
    img = next((tiny_synth / "semantic_MRs_anon").iterdir())
    plain = tmp_path / "plain.pth"
    import torch
    torch.save({"state": torch.zeros(2)}, plain)
    _one_line_error(run_cli("predict", "--checkpoint", plain, img, "--out", tmp_path / "o"), "plain.pth",
                    "not a hipseg checkpoint")
    _one_line_error(run_cli("predict", "--checkpoint", tmp_path / "none.pth", img, "--out", tmp_path / "o"),
                    "no such checkpoint")
    afile = tmp_path / "afile"  # a folder that cannot be created (works for root too)
    afile.write_text("x")
    _one_line_error(run_cli("predict", "--checkpoint", tiny_model, img, "--out", afile / "sub"), "cannot create")
    out = tmp_path / "o2"
    assert run_cli("predict", "--checkpoint", tiny_model, img, "--out", out, "--device", "cpu").returncode == 0
    target = next(out.iterdir())
    stamp = target.stat().st_mtime_ns
    _one_line_error(run_cli("predict", "--checkpoint", tiny_model, img, "--out", out), "already exists", "--overwrite")
    assert target.stat().st_mtime_ns == stamp, "existing output untouched"


def test_evaluate_cli(tiny_model, tiny_synth, tmp_path):
    pair_imgs = sorted((tiny_synth / "semantic_MRs_anon").iterdir())[:2]
    r = run_cli("predict", "--checkpoint", tiny_model, *pair_imgs, "--out", tmp_path / "p", "--device", "cpu")
    assert r.returncode == 0
    js = tmp_path / "m.json"
    r = run_cli("evaluate", "--pred", tmp_path / "p", "--truth", tiny_synth / "semantic_labels_anon", "--json", js)
    assert r.returncode == 0, r.stderr
    assert "dice" in r.stdout and "hd95 mm" in r.stdout
    doc = json.loads(js.read_text())
    assert len(doc["cases"]) == 2 and doc["unmatched"] == [] and len(doc["truths_without_prediction"]) > 0
    assert "truth file(s) have no prediction" in r.stdout
    _one_line_error(run_cli("evaluate", "--pred", tmp_path / "p", "--truth", tiny_synth / "semantic_labels_anon",
                            "--json", js), "already exists")
    empty = tmp_path / "e"
    empty.mkdir()
    r = run_cli("evaluate", "--pred", empty, "--truth", tiny_synth / "semantic_labels_anon")
    _one_line_error(r, "holds no .nii")


def test_train_outside_a_project_checkout_says_where_to_point_data(tmp_path, monkeypatch):
    """One data policy: --data, else $HIPSEG_DATA, else the project's synthetic set; with no project
    checkout there is no default to make, and the error says so."""
    monkeypatch.setenv("HIPSEG_ROOT", str(tmp_path))  # a folder that is not a hipseg checkout
    monkeypatch.delenv("HIPSEG_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    r = run_cli("train", "--preset", "smoke", "--out", tmp_path / "m")
    _one_line_error(r, "no hipseg project checkout", "--data")
    assert not (tmp_path / "data").exists() and not (tmp_path / "m").exists()
    monkeypatch.setenv("HIPSEG_DATA", str(tmp_path / "nowhere"))
    _one_line_error(run_cli("train", "--preset", "smoke"), "nowhere: no such folder")


def test_train_config_that_is_not_an_object_is_a_one_line_error(tmp_path, tiny_synth):
    for text, kind in (("[1, 2]", "list"), ('"epochs=3"', "str")):
        cfg = tmp_path / f"{kind}.json"
        cfg.write_text(text)
        _one_line_error(run_cli("train", "--data", tiny_synth, "--config", cfg), f"{kind}.json",
                        f"expected a JSON object of settings, found a JSON {kind}")


def test_book_with_an_unknown_chapter_is_a_one_line_error(tmp_path, tiny_synth):
    _one_line_error(run_cli("book", "--data", tiny_synth, "--chapter", "06_nowhere", "--no-build"),
                    "unknown chapter(s): 06_nowhere", "choose from 01_data_exploration")


def test_under_torchrun_the_default_set_is_not_generated(tmp_path):
    """Every process would make it at once: under torchrun (WORLD_SIZE set) it must exist already."""
    project = tmp_path / "project"
    (project / "book").mkdir(parents=True)
    (project / "_config.yml").write_text("title: x\n")
    env = {"HIPSEG_ROOT": str(project), "WORLD_SIZE": "2", "RANK": "0", "HIPSEG_DATA": None}
    r = run_cli("train", "--preset", "smoke", "--out", tmp_path / "m", env=env)
    _one_line_error(r, "no data yet", "hipseg synth --out")
    assert not (project / "data").exists(), "nothing generated"


def test_book_refuses_an_unknown_chapter_before_making_data(tmp_path):
    """A mistyped --chapter is one line and exit 1, found before the (slow) default data set is made."""
    missing = tmp_path / "nothing-here"
    r = run_cli("book", "--chapter", "04_trainig", "--no-build", "--data", missing)
    assert r.returncode == 1
    assert "unknown chapter(s): 04_trainig; choose from 01_data_exploration" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_the_full_preset_without_a_usable_gpu_says_why_instead_of_training_on_the_cpu(tmp_path, tiny_synth,
                                                                                      monkeypatch):
    """``--preset full`` is made for a GPU: where CUDA cannot be used, the run stops before any
    work with one line that says why and what to choose, and exit 1; the CPU is used only when
    asked for."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    r = run_cli("train", "--preset", "full", "--data", tiny_synth, "--out", tmp_path / "m", "--quiet")
    _one_line_error(r, "preset 'full' is made for a CUDA GPU", "no CUDA", "--device cpu")
    assert not (tmp_path / "m").exists()
    r = run_cli("train", "--preset", "smoke", "--device", "cuda", "--data", tiny_synth, "--out", tmp_path / "n",
                "--quiet")
    _one_line_error(r, "device 'cuda' asked for", "no CUDA")
