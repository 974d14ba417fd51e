"""A synthetic stand-in for the HipMRI study: axial male pelvis T2-like MR with 6 classes.

Anatomy is defined in millimetres in a patient frame (x to the patient's left, y to
posterior, z to superior) and sampled on each volume's own grid, so volumes of one data
set differ in shape and voxel spacing just as the real ones do. Each case has its own
anatomy; its weekly scans share it, with different bladder and rectum filling and a
small shift. Intensities are T2-like with overlapping class distributions, a smooth
bias field, partial-volume blur and Rician noise, so that intensity alone cannot
segment it.

Files are written in the CSIRO release layout::

    OUT/semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz
    OUT/semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import BACKGROUND, BLADDER, BODY, BONES, CLASS_NAMES, PROSTATE, RECTUM, HipsegError, __version__

__all__ = ["DEFAULT_SHAPE", "SynthSpec", "TISSUES", "make_case_anatomy", "render_volume", "make_dataset"]

DEFAULT_SHAPE: tuple[int, int, int] = (128, 128, 64)
IMAGE_DIR = "semantic_MRs_anon"
LABEL_DIR = "semantic_labels_anon"

# Tissue intensities of a T2-weighted fast spin-echo scan (arbitrary units before texture, bias,
# blur and noise): mean, spread between cases. Urine is the brightest, then fat (subcutaneous,
# pelvic, ischioanal and fatty marrow); muscle is dark grey; cortical bone and gas are black.
_T = {
    "air": (0.0, 0.0),
    "fat": (0.74, 0.05),
    "muscle": (0.28, 0.04),
    "cortex": (0.06, 0.02),
    "marrow": (0.60, 0.06),
    "urine": (1.00, 0.03),
    "bladder_wall": (0.26, 0.04),
    "rectal_wall": (0.32, 0.05),
    "gas": (0.04, 0.02),
    "stool": (0.50, 0.12),
    "prostate_pz": (0.66, 0.07),
    "prostate_tz": (0.40, 0.06),
    "prostate_stroma": (0.24, 0.04),
    "bowel": (0.50, 0.20),
}
TISSUES: tuple[str, ...] = tuple(_T)  # index of each tissue in the map that render_volume can return


@dataclass(frozen=True)
class SynthSpec:
    """Grid of one synthetic volume: shape and voxel spacing in mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """LPS affine (voxel axes point to patient left, posterior, superior), centred."""
        sx, sy, sz = self.spacing
        aff = np.diag([-sx, -sy, sz, 1.0])
        aff[:3, 3] = [(n - 1) / 2 * s * sign for n, s, sign in zip(self.shape, self.spacing, (1, 1, -1))]
        return aff


def make_case_anatomy(rng: np.random.Generator) -> dict:
    """Sample one patient's anatomy (sizes and positions in mm)."""
    n = rng.normal
    body_scale = float(np.clip(n(1.0, 0.06), 0.85, 1.15))
    return {
        "body_a": 178.0 * body_scale * n(1.0, 0.03),
        "body_b": 126.0 * body_scale * n(1.0, 0.04),
        "body_y": n(6.0, 3.0),
        "fat": float(np.clip(n(22.0, 6.0), 10.0, 38.0)),
        "fh_x": 92.0 * body_scale * n(1.0, 0.03),
        "fh_r": float(np.clip(n(24.0, 1.5), 20.0, 28.0)),
        "fh_z": n(-32.0, 4.0),
        "bone_scale": float(np.clip(n(1.0, 0.06), 0.85, 1.15)),
        "prostate_scale": float(np.clip(n(1.1, 0.12), 0.8, 1.4)),
        "prostate_y": n(-14.0, 3.0),
        "prostate_z": n(-48.0, 4.0),
        "rectum_r": float(np.clip(n(17.0, 2.0), 13.0, 22.0)),
        "tilt": n(0.0, 0.04),
        "bowel": [(n(0, 50), n(-50, 20), n(75, 12), abs(n(20, 6)) + 8) for _ in range(rng.integers(3, 7))],
        "intensity_gain": float(np.clip(n(1.0, 0.08), 0.8, 1.2)),
    }


def _rot(axis: str, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if axis == "x":
        return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


class _Canvas:
    """Voxel grid with patient-frame coordinates; shapes are evaluated in bounding boxes."""

    def __init__(self, spec: SynthSpec, shift_mm: np.ndarray):
        self.shape = spec.shape
        self.axes = [
            (np.arange(n) - (n - 1) / 2) * s - d for n, s, d in zip(spec.shape, spec.spacing, shift_mm)
        ]

    def box(self, center, bound):
        sl, coords = [], []
        for ax, (c, b) in enumerate(zip(center, bound)):
            a = self.axes[ax]
            lo, hi = np.searchsorted(a, c - b), np.searchsorted(a, c + b)
            sl.append(slice(int(lo), int(hi)))
            shp = [1, 1, 1]
            shp[ax] = -1
            coords.append((a[lo:hi] - c).reshape(shp))
        return tuple(sl), coords

    def ellipsoid(self, center, semi, rot: np.ndarray | None = None, shell: float = 0.0):
        """Return (slices, mask) of an ellipsoid; with ``shell`` > 0 also the inner mask."""
        bound = [max(semi)] * 3 if rot is not None else list(semi)
        sl, (dx, dy, dz) = self.box(center, bound)
        if rot is not None:
            r = rot
            lx = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
            ly = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
            lz = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
        else:
            lx, ly, lz = dx, dy, dz
        q = (lx / semi[0]) ** 2 + (ly / semi[1]) ** 2 + (lz / semi[2]) ** 2
        q = np.broadcast_to(q, tuple(s.stop - s.start for s in sl))
        if shell <= 0:
            return sl, q <= 1.0
        inner = [max(s - shell, 1e-3) for s in semi]
        qi = (lx / inner[0]) ** 2 + (ly / inner[1]) ** 2 + (lz / inner[2]) ** 2
        return sl, q <= 1.0, np.broadcast_to(qi, q.shape) <= 1.0


def _muscle_groups(anat: dict) -> list[tuple[tuple, tuple, np.ndarray | None]]:
    """(centre, semi-axes, rotation) of the muscles either side: gluteus maximus, gluteus medius,
    iliopsoas, obturator internus and the thigh muscles, then rectus abdominis (mm)."""
    fx, fz = anat["fh_x"], anat["fh_z"]
    out = []
    for sign in (-1, 1):
        out += [((sign * (fx - 2), 78, fz - 5), (62, 32, 85), _rot("z", -sign * 0.45)),   # gluteus maximus
                ((sign * (fx + 28), 28, fz + 60), (36, 46, 55), None),                    # gluteus medius
                ((sign * (fx - 18), -40, fz + 35), (26, 24, 80), None),                   # iliopsoas
                ((sign * (fx - 32), 22, fz - 14), (13, 44, 30), None),                    # obturator internus
                ((sign * (fx + 12), 0, fz - 105), (62, 70, 62), None)]                    # thigh
    out.append(((0, -112 + anat["body_y"], 60), (48, 10, 120), None))                      # rectus abdominis
    return out


class _Painter:
    """The label, tissue-intensity and tissue-kind maps of one scan, painted object by object."""

    def __init__(self, spec: SynthSpec, level: dict):
        self.label = np.zeros(spec.shape, np.uint8)
        self.tissue = np.zeros(spec.shape, np.float32)
        self.kind = np.zeros(spec.shape, np.uint8)
        self.level = level

    def __call__(self, sl, mask, name, cls=None):
        if cls is not None:
            self.label[sl][mask] = cls
        self.tissue[sl][mask] = self.level[name]
        self.kind[sl][mask] = TISSUES.index(name)


def render_volume(anat: dict, spec: SynthSpec, week_rng: np.random.Generator,
                  return_tissue: bool = False):
    """Render one weekly scan of a case: returns (image int16, label uint8).

    Args:
        anat: the case's anatomy from :func:`make_case_anatomy`.
        spec: grid shape and spacing.
        week_rng: randomness of this week (filling, shift, noise).
        return_tissue: also return a uint8 map of the tissue drawn at each voxel (an index into
            :data:`TISSUES`), before blur and noise.
    """
    n = week_rng.normal
    shift = np.array([n(0, 2.0), n(0, 2.0), n(0, 3.0)])
    cv = _Canvas(spec, shift)
    tex_rng = np.random.default_rng(week_rng.integers(2**32))
    paint = _Painter(spec, {name: mean + sd * tex_rng.standard_normal() for name, (mean, sd) in _T.items()})
    body = _paint_body(cv, anat, spec, paint)
    _paint_bones(cv, anat, paint)
    _paint_rectum(cv, anat, week_rng, paint)
    _paint_bladder_and_prostate(cv, anat, week_rng, paint)
    label, tissue, kind = paint.label, paint.tissue, paint.kind
    label[~body] = BACKGROUND
    tissue[~body] = 0.0
    kind[~body] = 0
    image = _acquire(tissue, kind, spec, cv, anat, tex_rng)
    return (image, label, kind) if return_tissue else (image, label)


def _paint_body(cv: "_Canvas", anat: dict, spec: SynthSpec, paint: _Painter) -> np.ndarray:
    """Subcutaneous fat around everything, muscle groups, the levator ani and bowel loops; pelvic
    fat fills what no organ or muscle takes. Returns the body mask."""
    x, y, z = cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :]
    taper = 1.0 + 0.0005 * z + anat["tilt"] * z / 100.0
    a, b = anat["body_a"] * taper, anat["body_b"] * taper
    p = 2.4
    body = np.broadcast_to((np.abs(x / a) ** p + np.abs((y - anat["body_y"]) / b) ** p) <= 1.0, spec.shape)
    everywhere = (slice(None),) * 3
    paint(everywhere, body, "fat", BODY)
    # Muscles, each a group of bundles separated by thin bright fat septa.
    for centre, semi, rot in _muscle_groups(anat):
        sl, m = cv.ellipsoid(centre, semi, rot)
        paint(sl, m, "muscle")
    f = anat["fat"]
    inside = (np.abs(x / (a - f)) ** p + np.abs((y - anat["body_y"]) / (b - f * 0.8)) ** p) <= 1.0
    kind = paint.kind
    kind[body & ~np.broadcast_to(inside, spec.shape) & (kind == TISSUES.index("muscle"))] = TISSUES.index("fat")
    paint.tissue[kind == TISSUES.index("fat")] = paint.level["fat"]
    # Levator ani: a thin muscular sling under the prostate, around the rectum.
    sl, outer, inner = cv.ellipsoid((0, 34, anat["prostate_z"] - 22), (44, 40, 26), shell=4.0)
    paint(sl, outer & ~inner & (cv.axes[2][sl[2]][None, None, :] < anat["prostate_z"] - 8), "muscle")
    for cx, cy, cz, r in anat["bowel"]:  # bowel loops above the bladder (class body)
        sl, m = cv.ellipsoid((cx, cy, cz), (r, r * 0.8, r * 0.9))
        paint(sl, m, "bowel")
    return body


def _paint_bones(cv: "_Canvas", anat: dict, paint: _Painter) -> None:
    """Femora, hip bones, sacrum and coccyx: a black cortex around fatty marrow."""
    bs = anat["bone_scale"]

    def bone(center, semi, rot=None):
        semi = [s * bs for s in semi]
        sl, outer, inner = cv.ellipsoid(center, semi, rot, shell=2.5)
        paint(sl, outer, "cortex", BONES)
        paint(sl, inner, "marrow")

    for sign in (-1, 1):
        fx, fz, fr = sign * anat["fh_x"], anat["fh_z"], anat["fh_r"]
        bone((fx, 4, fz), (fr, fr, fr))  # femoral head
        bone((sign * (anat["fh_x"] + 22), 8, fz - 22), (34, 15, 15), _rot("y", sign * 0.7))  # neck
        bone((sign * (anat["fh_x"] + 40), 12, fz - 80), (16, 16, 60))  # shaft
        bone((sign * (anat["fh_x"] - 6), 14, fz + 22), (30, 24, 20))  # acetabular roof
        bone((sign * (anat["fh_x"] - 4), 40, fz + 75), (10, 62, 58), _rot("z", -sign * 0.55))  # ilium
        bone((sign * 42, -52, fz - 10), (42, 10, 13), _rot("z", sign * 0.35))  # pubic ramus
        bone((sign * 58, 38, fz - 28), (13, 22, 26))  # ischium
    bone((0, 88, 48), (44, 18, 58), _rot("x", 0.5))  # sacrum
    bone((0, 96, -8), (10, 9, 16))  # coccyx


def _paint_rectum(cv: "_Canvas", anat: dict, week_rng: np.random.Generator, paint: _Painter) -> None:
    """A tube curving posteriorly upwards, with a dark wall and gas or stool inside (weekly)."""
    fill_r = float(np.clip(week_rng.normal(1.0, 0.18), 0.7, 1.4))
    rr = anat["rectum_r"] * fill_r
    content = "gas" if week_rng.random() < 0.4 else "stool"
    for zc in np.arange(-85.0, 30.0, 3.0):
        yc = 26 + 0.22 * max(zc + 35, 0) + 0.004 * max(zc + 35, 0) ** 2
        sl, outer, inner = cv.ellipsoid((0.0, yc, zc), (rr * 1.15, rr, 4.0), shell=3.5)
        paint(sl, outer, "rectal_wall", RECTUM)
        paint(sl, inner, content)


def _paint_bladder_and_prostate(cv: "_Canvas", anat: dict, week_rng: np.random.Generator,
                                paint: _Painter) -> None:
    """The bladder (weekly filling; urine the brightest, a thin dark wall) on the prostate: an
    intermediate transition zone, a bright peripheral zone behind and to the sides, dark
    fibromuscular stroma in front."""
    fill = float(np.clip(week_rng.normal(1.0, 0.22), 0.5, 1.5))
    ps = anat["prostate_scale"]
    pz = anat["prostate_z"]
    semi_b = np.array([46.0, 34.0, 34.0]) * fill ** (1 / 3)
    zb = pz + 20 * ps + semi_b[2] - 6
    sl, outer, inner = cv.ellipsoid((0.0, -38.0 + 4 * (1 - fill), zb), semi_b, shell=3.0)
    paint(sl, outer, "bladder_wall", BLADDER)
    paint(sl, inner, "urine")
    semi_p = np.array([26.0, 20.0, 22.0]) * ps
    py = anat["prostate_y"]
    sl, outer, inner = cv.ellipsoid((0.0, py, pz), semi_p, shell=6.0)
    yy = np.broadcast_to(cv.axes[1][sl[1]][None, :, None] - py, outer.shape)
    paint(sl, outer, "prostate_tz", PROSTATE)
    paint(sl, outer & ~inner & (yy > -0.2 * semi_p[1]), "prostate_pz")
    paint(sl, outer & ~inner & (yy < -0.6 * semi_p[1]), "prostate_stroma")


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _acquire(tissue, kind, spec: SynthSpec, cv: _Canvas, anat: dict, rng: np.random.Generator) -> np.ndarray:
    """Texture, fat septa in muscle, partial-volume blur, bias field and Rician noise."""
    vox = np.array(spec.spacing)
    muscle = kind == TISSUES.index("muscle")
    # Septa: where a smooth random field crosses zero, a thin bright line of fat between bundles.
    septa = np.abs(_smooth_noise(rng, spec.shape, 5.0 / vox)) < 0.12
    tissue = np.where(muscle & septa, tissue + 0.45 * (_T["fat"][0] - tissue), tissue)
    # Grain: soft tissue and marrow are not flat.
    grain = _smooth_noise(rng, spec.shape, 1.0)
    tissue = tissue * (1.0 + 0.07 * grain)
    marrow = kind == TISSUES.index("marrow")
    tissue[marrow] *= 1.0 + 0.10 * _smooth_noise(rng, spec.shape, 0.7)[marrow]
    img = ndimage.gaussian_filter(tissue, sigma=0.6 * 1.8 / vox)
    cx, cy, cz = (ax / 150.0 for ax in cv.axes)
    k = rng.normal(0, 0.25, size=6)
    bias = np.exp(k[0] * cx[:, None, None] + k[1] * cy[None, :, None] + k[2] * cz[None, None, :]
                  + k[3] * (cx[:, None, None] ** 2) + k[4] * (cy[None, :, None] ** 2)
                  + k[5] * cx[:, None, None] * cy[None, :, None])
    img = img * bias * anat["intensity_gain"]
    sigma = 0.045
    img = np.sqrt((img + sigma * rng.standard_normal(spec.shape)) ** 2
                  + (sigma * rng.standard_normal(spec.shape)) ** 2)
    return np.clip(img * 1000.0, 0, 32767).astype(np.int16)


def _case_specs(n_cases: int, weeks_range: tuple[int, int], shape, rng) -> list[dict]:
    X, Y, Z = shape
    deep = int(round(Z * 144 / 128))
    cases = []
    for i in range(n_cases):
        depth = deep if rng.random() < 0.2 else Z
        sxy = float(rng.uniform(1.7, 1.9)) * 256 / X
        sz = float(rng.uniform(1.5, 2.5)) * 128 / Z
        if depth != Z:
            sz = sz * Z / depth * 1.05
        n_weeks = int(rng.integers(weeks_range[0], weeks_range[1] + 1))
        weeks = sorted(rng.choice(np.arange(8), size=n_weeks, replace=False).tolist())
        cases.append({"case": f"{4 + i * 3:03d}", "shape": (X, Y, depth), "spacing": (sxy, sxy, sz),
                      "weeks": weeks, "seed": int(rng.integers(2**31))})
    return cases


def _write_case(job: dict) -> list[str]:
    rng = np.random.default_rng(job["seed"])
    anat = make_case_anatomy(rng)
    spec = SynthSpec(tuple(job["shape"]), tuple(job["spacing"]))
    written = []
    for week in job["weeks"]:
        image, label = render_volume(anat, spec, np.random.default_rng([job["seed"], week]))
        stem = f"Case_{job['case']}_Week{week}"
        img_nii = nib.Nifti1Image(image, spec.affine)
        lab_nii = nib.Nifti1Image(label, spec.affine)
        for nii in (img_nii, lab_nii):
            nii.header.set_xyzt_units("mm", "sec")
            nii.header.set_qform(spec.affine, code=1)
            nii.header.set_sform(spec.affine, code=1)
        nib.save(img_nii, os.path.join(job["out"], IMAGE_DIR, f"{stem}_LFOV.nii.gz"))
        nib.save(lab_nii, os.path.join(job["out"], LABEL_DIR, f"{stem}_SEMANTIC_LFOV.nii.gz"))
        written.append(stem)
    return written


def make_dataset(out: str | os.PathLike, seed: int = 0, cases: int = 30,
                 shape: tuple[int, int, int] = DEFAULT_SHAPE, weeks: tuple[int, int] = (2, 5),
                 workers: int | None = None, overwrite: bool = False) -> Path:
    """Write a synthetic HipMRI-like data set in the CSIRO release layout.

    The set is built in a temporary folder beside ``out`` and renamed into place, so an
    interrupted run leaves nothing half-written at ``out``.

    Args:
        out: destination folder (must not exist unless ``overwrite``).
        seed: everything is determined by it.
        cases: number of patients.
        shape: in-plane size and base depth; about a fifth of the cases get
            depth ``round(Z * 144 / 128)``, as some real volumes have 144 slices, not 128.
        weeks: min and max number of weekly scans per case (weeks drawn from 0..7).
        workers: processes (default: CPU count).
        overwrite: replace an existing folder written by this function.

    Returns:
        The folder.

    Example:
        >>> make_dataset("data/synthetic", seed=0, cases=30)  # doctest: +SKIP
    """
    out = Path(out)
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16, got {tuple(shape)}")
    if not 1 <= weeks[0] <= weeks[1] <= 8:
        raise ValueError(f"weeks must satisfy 1 <= min <= max <= 8, got {weeks}")
    if out.exists():
        if not overwrite:
            raise HipsegError(f"{out}: already exists (use --overwrite to replace it)")
        if not (out / "synth.json").exists():
            raise HipsegError(f"{out}: not a synthetic set made by hipseg; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / IMAGE_DIR).mkdir()
        (tmp / LABEL_DIR).mkdir()
        rng = np.random.default_rng(seed)
        jobs = _case_specs(cases, weeks, tuple(int(s) for s in shape), rng)
        for j in jobs:
            j["out"] = str(tmp)
        workers = workers or min(os.cpu_count() or 1, len(jobs))
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_case, jobs))
        else:
            for j in jobs:
                _write_case(j)
        meta = {"generator": "hipseg synth", "version": __version__, "seed": seed, "cases": cases,
                "shape": list(shape), "weeks": list(weeks), "classes": list(CLASS_NAMES),
                "volumes": sum(len(j["weeks"]) for j in jobs)}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
