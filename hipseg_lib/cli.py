"""The ``hipseg`` command line (also ``python -m hipseg_lib``).

Verbs: ``synth``, ``check``, ``train``, ``predict``, ``export``, ``convert``, ``evaluate``, ``book``, ``lab``.
Errors about user input print one line ``hipseg: error: <file>: <problem>`` and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import BEST_NAME, PRECISIONS, HipsegError, OutputExists, __version__

__all__ = ["main", "build_parser"]


def shape_type(text: str) -> tuple[int, int, int]:
    """The one shape syntax of the command line (and the benchmarks): ``64x64x32``."""
    parts = text.replace(",", " ").replace("x", " ").split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected three sizes like 64x64x32, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def cmd_synth(a: argparse.Namespace) -> int:
    import time

    from .synth import make_dataset

    t = time.perf_counter()
    out = make_dataset(a.out, seed=a.seed, cases=a.cases, shape=a.shape, weeks=(a.min_weeks, a.max_weeks),
                       workers=a.workers, overwrite=a.overwrite)
    meta = json.loads((out / "synth.json").read_text())
    print(f"wrote {meta['volumes']} image/label pairs of {a.cases} cases to {out} "
          f"in {time.perf_counter() - t:.1f} s")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from .check import audit_folder, format_audit

    audit = audit_folder(a.dir, progress=not a.quiet)
    print(format_audit(audit, max_rows=a.rows))
    return 1 if audit.problems else 0


# The settings with a flag of their own in ``hipseg train``; any other goes by ``--set KEY=VALUE``.
TRAIN_FLAGS = ("epochs", "batch_size", "lr", "target_shape", "patch_shape", "base_channels", "depth", "seed",
               "dice_weight", "augmentation", "fold", "folds")


def parse_settings(items: Sequence[str] | None) -> dict:
    """``["epochs=3", "target_shape=[64,64,48]"]`` -> overrides; each value read as JSON, else a string."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise HipsegError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        if value.lower() in ("true", "false"):  # as Python writes them, too
            value = value.lower()
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_config_of(a: argparse.Namespace):
    """The preset, then --config, then the dedicated flags, then --set (each over the ones before)."""
    from .config import make_config

    overrides: dict = {}
    if a.config:
        path = Path(a.config)
        if not path.is_file():
            raise HipsegError(f"{path}: no such config file")
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise HipsegError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(settings, dict):
            raise HipsegError(f"{path}: expected a JSON object of settings, found a JSON {type(settings).__name__}")
        overrides.update(settings)
    overrides.update({name: getattr(a, name) for name in TRAIN_FLAGS if getattr(a, name) is not None})
    overrides.update(parse_settings(a.set))
    try:
        return make_config(a.preset, **overrides)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, HipsegError):
            raise
        raise HipsegError(f"bad training settings: {exc}") from None


def cmd_train(a: argparse.Namespace) -> int:
    from .distributed import Launch
    from .locations import default_cache_dir, ensure_default_dataset, resolve_data_dir
    from .trainer import RunOptions, Trainer

    launch = Launch.from_environment()
    # Under torchrun every process would make the default set at once: there it must exist.
    data = resolve_data_dir(a.data) if launch.distributed else ensure_default_dataset(a.data)
    cfg = train_config_of(a)
    options = RunOptions(cache_dir=a.cache_dir or default_cache_dir(), device=a.device, precision=a.precision,
                         compile=a.compile, max_minutes=a.max_minutes, save_every_epoch=a.save_every_epoch)
    result = Trainer(cfg, data, a.out, options, resume=a.resume, progress=not a.quiet, launch=launch).fit()
    if launch.main:
        best = f"best checkpoint: {result.best_path}" if result.best_path else "no validation, no best checkpoint"
        print(f"{best}  last: {result.last_path}  ({result.stopped_because})")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .predict import onnx_predictor, predict_files

    changes: dict = {"tta": a.tta}
    if a.postprocess is not None:
        changes["postprocess"] = a.postprocess
    if a.model:
        if a.checkpoint:
            raise HipsegError("give --checkpoint or --model, not both")
        if Path(a.model).suffix.lower() != ".onnx":
            raise HipsegError(f"{a.model}: --model takes an .onnx file written by hipseg export")
        predictor = onnx_predictor(a.model, **changes)  # ONNX Runtime only: torch is never imported
    else:
        from .checkpoint import load_predictor

        predictor = load_predictor(a.checkpoint or f"model/{BEST_NAME}", a.device, **changes)
    written = predict_files(predictor, a.inputs, a.out, overwrite=a.overwrite, progress=not a.quiet,
                            probabilities=a.probabilities)
    extra = " and probability maps" if a.probabilities else ""
    print(f"wrote {len(written)} label map(s){extra} to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import describe, export_model

    model_file, json_file = export_model(a.checkpoint, a.format, a.out, overwrite=a.overwrite)
    print(f"wrote {model_file} and {json_file.name} ({describe(json_file)})")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import to_nnunet

    counts = to_nnunet(a.data, a.out, split_seed=a.split_seed, overwrite=a.overwrite)
    print(f"wrote {a.out}: {counts['train'] + counts['val']} training volumes (imagesTr, labelsTr; "
          f"fold 0 of splits_final.json: {counts['train']} train, {counts['val']} val) and "
          f"{counts['test']} test volumes (imagesTs, labelsTs)")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ._atomic import write_json_atomic
    from .folders import evaluate_folders, format_summary

    if a.json and Path(a.json).exists() and not a.overwrite:
        raise OutputExists(a.json)
    doc = evaluate_folders(a.pred, a.truth, progress=not a.quiet)
    print(f"{len(doc['cases'])} case(s) scored; {len(doc['truths_without_prediction'])} truth file(s) "
          "have no prediction")
    print(format_summary(doc["summary"], per_patient=doc["per_patient"]))
    for u in doc["unmatched"][:10]:
        print(f"prediction with no truth: {u}")
    if len(doc["unmatched"]) > 10:
        print(f"... and {len(doc['unmatched']) - 10} more predictions with no truth")
    if a.json:
        write_json_atomic(doc, a.json)
        print(f"wrote {a.json}")
    return 0


def cmd_lab(a: argparse.Namespace) -> int:
    from .lab import run_lab

    return run_lab(port=a.port, data_dir=a.data, notebook_dir=a.dir)


def cmd_book(a: argparse.Namespace) -> int:
    from .book import BookPlan, run_book

    run_book(BookPlan(preset=a.preset, data_dir=a.data, precision=a.precision, chapters=a.chapter,
                      repository=a.repository), build=not a.no_build)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hipseg", description="3D segmentation of pelvic MRI with a residual 3D U-Net.")
    p.add_argument("--version", action="version", version=f"hipseg {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in (_add_synth, _add_check, _add_train, _add_predict, _add_export, _add_convert, _add_evaluate,
                _add_book, _add_lab):
        add(sub)
    return p


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="write the synthetic HipMRI-like data set",
                       description="Write a synthetic HipMRI-like data set in the CSIRO release layout.")
    s.add_argument("--out", required=True, help="destination folder (must not exist)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cases", type=int, default=30, help="number of patients (default 30)")
    s.add_argument("--shape", type=shape_type, default=(128, 128, 64), metavar="XxYxZ",
                   help="in-plane size and base depth (default 128x128x64; 256x256x128 is the real size)")
    s.add_argument("--min-weeks", type=int, default=2)
    s.add_argument("--max-weeks", type=int, default=5)
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing synthetic set")
    s.set_defaults(func=cmd_synth)


def _add_check(sub) -> None:
    c = sub.add_parser("check", help="audit a data folder", description=(
        "Audit a data folder: pairs, unmatched files, shapes, spacings, dtypes, labels per class, "
        "volumes per case. Exits 1 when there are problems."))
    c.add_argument("dir")
    c.add_argument("--rows", type=int, default=20, help="pairs to list in the table")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_check)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a ResUNet3D", description=(
        "Train on a data folder with a preset; run under torchrun for several processes or GPUs."),
        epilog=("Settings are applied in this order, each over the ones before: the preset, then "
                "--config, then the dedicated flags (--epochs, --lr, ...), then --set. Network and "
                "preprocessing settings go by their own names (--set depth=5, --set "
                "target_shape=[64,64,48])."))
    t.add_argument("--preset", default="auto", help="smoke, cpu, full, or auto (full with CUDA, else cpu)")
    t.add_argument("--data", default=None, help="data folder (default: $HIPSEG_DATA, else the project's "
                   "synthetic set, made on first use)")
    t.add_argument("--out", default="model", help="checkpoint/log folder (default model/)")
    t.add_argument("--config", default=None, help="JSON file of settings applied over the preset")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other setting (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    _add_setting_flags(t)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each of :data:`TRAIN_FLAGS`, its type read from the settings' annotations, and the run's
    options. Without PyTorch (a PC that only runs exported models) there are no settings to read: the
    verb then says it needs PyTorch."""
    import types
    import typing

    try:
        from .config import TrainConfig
        from .model import ModelConfig
        from .preprocess import Preprocessing
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        parser.set_defaults(func=_needs_torch)
        return
    hints = {name: hint for cls in (TrainConfig, ModelConfig, Preprocessing)
             for name, hint in typing.get_type_hints(cls).items()}
    for name in TRAIN_FLAGS:
        flag, hint = "--" + name.replace("_", "-"), hints[name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)  # X | None: X
        if any(typing.get_origin(k) is tuple for k in kinds):
            parser.add_argument(flag, type=shape_type, metavar="XxYxZ", help=f"{name}, e.g. 64x64x48")
        else:
            kind = next(k for k in kinds if k in (int, float, str))
            parser.add_argument(flag, type=kind, metavar=name.upper())
    run = parser.add_argument_group("where and how it runs (not stored as settings of the experiment)")
    run.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu, cuda, cuda:1, ...")
    run.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="auto: bf16 where the device computes it natively, fp16 on an older GPU, else fp32")
    run.add_argument("--compile", action="store_true", help="torch.compile the network (eager if it fails)")
    run.add_argument("--max-minutes", type=float, default=0.0,
                     help="a safety net on the run's time (0: none): the run is shortened, loudly")
    run.add_argument("--cache-dir", default=None, help="preprocessing cache (default: $HIPSEG_CACHE, else "
                     "~/.cache/hipseg)")
    run.add_argument("--save-every-epoch", action="store_true", help="write last.pth after every epoch")


def _needs_torch(a: argparse.Namespace) -> int:
    raise HipsegError(f"hipseg {a.verb} needs PyTorch, which is not installed here "
                      "(an exported .onnx model predicts without it)")


def _add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="segment NIfTI scans with a checkpoint", description=(
        "Segment .nii/.nii.gz files (or folders of them); writes <name>_pred.nii.gz uint8 label maps "
        "with each input's shape, affine and header. Windows (when used) are blended with Gaussian "
        "weights. Every input is read and checked before the first output is written: a bad one "
        "(missing, corrupt, not 3D, NaN or constant) stops the run with its name and nothing written. "
        "Test-time mirroring and post-processing follow the checkpoint (the axes its training mirrored, and "
        "what chapter 5 chose on the validation patients, when it stored its choice)."))
    pr.add_argument("inputs", nargs="+", metavar="INPUT")
    pr.add_argument("--checkpoint", default=None, help=f"a hipseg checkpoint (default: model/{BEST_NAME})")
    pr.add_argument("--model", default=None, help="instead, an .onnx file from hipseg export, run by ONNX Runtime "
                    "(no PyTorch needed; --device does not apply)")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="also predict the scan mirrored along the axes training mirrored, and average "
                         "(--no-tta: one plain pass; default: as the checkpoint says)")
    pr.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                    help="keep only the largest connected piece of bladder, rectum and prostate "
                         "(default: as the checkpoint says)")
    pr.add_argument("--probabilities", action="store_true",
                    help="also write <name>_probs.nii.gz: per-class probabilities (x, y, z, class)")
    pr.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="a checkpoint to ONNX or TorchScript, for tools without hipseg", description=(
        "Write the checkpoint's network as ONNX (opset 17) or TorchScript into --out, with a JSON file beside "
        "it that says how to prepare its input and read its output. The exported model is run beside "
        "PyTorch on a synthetic scan first and must agree (logits within 3e-4 of the largest, the same labels "
        "except where two classes tie within that); otherwise nothing is written."))
    ex.add_argument("--checkpoint", default=f"model/{BEST_NAME}")
    ex.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--overwrite", action="store_true", help="replace existing files")
    ex.set_defaults(func=cmd_export)


def _add_convert(sub) -> None:
    cv = sub.add_parser("convert", help="a data folder in nnU-Net v2's raw layout, with hipseg's split",
                        description=(
        "Write DATA as an nnU-Net v2 raw dataset in OUT (named DatasetNNN_Name): imagesTr/labelsTr for "
        "hipseg's training and validation cases, imagesTs/labelsTs for its test cases, dataset.json, and "
        "splits_final.json with hipseg's split as fold 0 (copy it into nnUNet_preprocessed/DatasetNNN_Name/ "
        "after nnUNetv2_plan_and_preprocess). Case identifiers keep the case and week: Case_004_Week0."))
    cv.add_argument("--to", choices=("nnunet",), required=True)
    cv.add_argument("data", metavar="DATA", help="a hipseg (HipMRI-layout) data folder")
    cv.add_argument("out", metavar="OUT", help="the dataset folder to write, e.g. nnUNet_raw/Dataset501_HipMRI")
    cv.add_argument("--split-seed", type=int, default=0, help="hipseg's split seed (default 0: the presets')")
    cv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    cv.set_defaults(func=cmd_convert)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="score predicted label maps against truths", description=(
        "Pair predictions with truths by name; per-class Dice, IoU, HD95 and ASD (mm) per case and overall."))
    e.add_argument("--pred", required=True, help="folder of predicted label maps")
    e.add_argument("--truth", required=True, help="folder of true label maps")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)


def _add_book(sub) -> None:
    b = sub.add_parser("book", help="execute the chapters with papermill and build the HTML book",
                       description="Execute every chapter in table-of-contents order, then build _build/html.")
    b.add_argument("--preset", default="auto", help="smoke, cpu, full or auto (default)")
    b.add_argument("--data", default=None, help="real data folder (default: $HIPSEG_DATA or the synthetic set)")
    b.add_argument("--chapter", action="append", help="execute only this chapter (file stem; repeatable)")
    b.add_argument("--no-build", action="store_true", help="execute only, do not build HTML")
    b.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the chapters' precision (default: auto); fp32 runs the book as a CPU without "
                        "native bf16 does")
    b.add_argument("--repository", default=None, metavar="URL",
                   help="the book's public repository (the publishing workflow passes its own): adds the "
                        "repository, Binder and Colab buttons and the .ipynb download; default: none")
    b.set_defaults(func=cmd_book)


def _add_lab(sub) -> None:
    lab = sub.add_parser("lab", help="JupyterLab on the book, for stepping through it interactively",
                         description="Start JupyterLab on book/ (127.0.0.1 only, with a token) with the "
                                     "hipseg kernel and the data in place, and print the URL to open.")
    lab.add_argument("--port", type=int, default=8888, help="first port to try (the next free one is used)")
    lab.add_argument("--data", default=None, help="data folder (default: $HIPSEG_DATA or the synthetic set)")
    lab.add_argument("--dir", default=None, help="notebook folder (default: the project's book/)")
    lab.set_defaults(func=cmd_lab)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not _needs_torch:  # a verb that cannot run here takes any flags
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except HipsegError as exc:
        hint = f" ({exc.cli_hint})" if exc.cli_hint else ""
        print(f"hipseg: error: {exc}{hint}", file=sys.stderr, flush=True)
        # Under torchrun, let every process print its line (and import torch only then).
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's: the one place the CLI reads it itself
            from .distributed import Launch, wait_for_other_ranks
            wait_for_other_ranks(Launch.from_environment())
        return 1
    except KeyboardInterrupt:
        print("hipseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
