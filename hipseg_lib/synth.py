"""A synthetic stand-in for the HipMRI study: axial male pelvis T2-like MR with 6 classes.

Anatomy is defined in millimetres in a pelvis frame (origin between the femoral heads; x to the
patient's left, y posterior, z superior) and sampled on each volume's own grid, so volumes of one
data set differ in shape and voxel spacing just as the real ones do. Shapes are signed-distance
primitives (tubes along paths, curved plates, cups, a lofted sacrum) combined into the pelvic ring
(iliac wings, acetabula, pubic rami meeting at the symphysis, ischia, sacrum and coccyx), femora
with necks and trochanters, the lowest lumbar vertebrae, muscle filling the space between the
subcutaneous fat and the pelvic cavity, a winding rectum and sigmoid, a bladder shaped by its
filling and a prostate with its zones. Proportions follow published adult male measurements
(``references.bib``: femoral head centre 95 mm from the midline, head diameter about 48 mm,
neck-shaft angle about 129 degrees); the prostate (median 54 ml in the default set) is sized so
that background voxels outnumber it about 700 to 1, near the real set's 600.

Each case has its own size, habitus, organ sizes and a smooth random deformation of a few mm; its
weekly scans share them, with different bladder and rectum filling, gas, stool and bowel loops and
a small shift. Intensities are T2-like with overlapping class distributions, a smooth bias field,
partial-volume blur and Rician noise, so that intensity alone cannot segment it.

Files are written in the CSIRO release layout::

    OUT/semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz
    OUT/semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import (
    BACKGROUND,
    BLADDER,
    BODY,
    BONES,
    CLASS_NAMES,
    PROSTATE,
    RECTUM,
    HipsegError,
    OutputExists,
    __version__,
    available_cpus,
)

__all__ = ["ANATOMY", "DEFAULT_SHAPE", "SynthSpec", "TISSUES", "make_case_anatomy", "render_volume",
           "make_dataset", "anatomy_of"]

# The generation of the anatomy: one more whenever the arrays of a seed change on purpose (the
# recorded digest in tests/test_synth.py says when). 1: ellipsoids; 2: the pelvis from shapes.
# A set records it in synth.json, so a default set made by another generation is remade
# (locations.resolve_data_dir) instead of being taught from as if it were this one.
ANATOMY = 2

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
    "bowel_wall": (0.30, 0.04),
    "fluid": (0.90, 0.05),
    "seminal": (0.82, 0.06),
    "nodule": (0.47, 0.08),
    "cartilage": (0.40, 0.05),
    "disc": (0.52, 0.08),
    "csf": (0.95, 0.03),
    "vessel": (0.07, 0.03),
    "vein": (0.55, 0.12),
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
    """Sample one patient: where the pelvis lies in the field of view and its size, body habitus,
    organ sizes, the course of the rectum and sigmoid, and a smooth deformation of a few mm."""
    n = rng.normal

    def clip(mean, sd, lo, hi):
        return float(np.clip(n(mean, sd), lo, hi))

    size = clip(1.0, 0.05, 0.88, 1.12)
    waves = []  # the deformation: three plane waves along each axis, wavelengths 11-22 cm
    for axis in range(3):
        for _ in range(3):
            d = rng.normal(size=3)
            waves.append((axis, d / np.linalg.norm(d) * 2 * math.pi / rng.uniform(110, 220),
                          rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 2.0)))
    return {
        "origin": (n(0.0, 2.0), n(2.0, 4.0), n(12.0, 6.0)),  # femoral heads' midpoint
        "scale": tuple(size * clip(1.0, 0.025, 0.94, 1.06) for _ in range(3)),
        "fat": clip(22.0, 7.0, 8.0, 42.0),
        "body_ap": clip(1.0, 0.04, 0.9, 1.1),
        "fh_r": clip(24.0, 1.5, 20.0, 28.0),
        "sacrum_curve": clip(18.0, 5.0, 6.0, 30.0),
        "prostate": clip(1.1, 0.13, 0.8, 1.45),
        "prostate_at": (n(0.0, 1.5), n(-18.0, 2.5), n(-42.0, 4.0)),
        "nodules": [(n(0, 0.35), n(-0.2, 0.3), n(0.1, 0.3), rng.uniform(0.15, 0.32))
                    for _ in range(int(rng.integers(2, 7)))],
        "bladder_ml": clip(230.0, 60.0, 110.0, 380.0),
        "rectum_r": clip(18.0, 2.0, 14.0, 23.0),
        "rectum_x": tuple(n(0.0, 6.0) for _ in range(4)),
        "sigmoid": [tuple(n(0.0, 10.0, 3)) for _ in range(5)],
        "waves": waves,
        "fat_planes": [(*(d / np.linalg.norm(d) * 2 * math.pi / rng.uniform(70, 130)), rng.uniform(0, 2 * math.pi))
                       for d in rng.normal(size=(3, 2))],
        "intensity_gain": clip(1.0, 0.08, 0.8, 1.2),
    }


# Shapes are signed distances in mm (negative inside): each primitive returns its bounds in the
# pelvis frame and a function of the box's x, y, z arrays.

def _capsules(points, radii):
    """A tube along a polyline whose radius changes linearly between the points."""
    pts = np.asarray(points, float)
    r = np.broadcast_to(np.asarray(radii, float), (len(pts),))

    def sdf(x, y, z):
        out = None
        for a, b, ra, rb in zip(pts[:-1], pts[1:], r[:-1], r[1:]):
            d = b - a
            px, py, pz = x - a[0], y - a[1], z - a[2]
            t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
            s = np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2) - (ra + (rb - ra) * t)
            out = s if out is None else np.minimum(out, s)
        return out
    return (pts - r[:, None]).min(0), (pts + r[:, None]).max(0), sdf


def _ellipsoid(centre, semi):
    c, e = np.asarray(centre, float), np.asarray(semi, float)

    def sdf(x, y, z):
        return (np.sqrt(((x - c[0]) / e[0]) ** 2 + ((y - c[1]) / e[1]) ** 2 + ((z - c[2]) / e[2]) ** 2) - 1) * e.min()
    return c - e, c + e, sdf


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _plate(centre, eu, ev, semi, thick, bend):
    """A curved plate: outline an ellipse of semi-axes ``semi`` in the plane (eu, ev), thickness
    growing from ``thick[0]`` at its lower edge to ``thick[1]`` at its upper one, the surface
    bent by ``bend * u**2`` along its normal."""
    c, eu = np.asarray(centre, float), _unit(eu)
    ev = _unit(np.asarray(ev, float) - (np.asarray(ev, float) @ eu) * eu)
    ew = np.cross(eu, ev)
    (a, b), (t0, t1) = semi, thick
    ext = max(a, b) + max(t0, t1) + abs(bend) * a * a

    def sdf(x, y, z):
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        u = dx * eu[0] + dy * eu[1] + dz * eu[2]
        v = dx * ev[0] + dy * ev[1] + dz * ev[2]
        w = dx * ew[0] + dy * ew[1] + dz * ew[2]
        half = 0.5 * (t0 + (t1 - t0) * np.clip((v / b + 1) / 2, 0.0, 1.0))
        return np.maximum(np.abs(w - bend * u * u) - half, (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1) * min(a, b))
    return c - ext, c + ext, sdf, ew


def _cup(centre, r_in, r_out, opening, cos_open):
    """A spherical shell open in the direction ``opening`` (the acetabulum around a femoral head)."""
    c, o = np.asarray(centre, float), _unit(opening)
    mid, half = (r_in + r_out) / 2, (r_out - r_in) / 2

    def sdf(x, y, z):
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        d = np.sqrt(dx * dx + dy * dy + dz * dz)
        return np.maximum(np.abs(d - mid) - half, dx * o[0] + dy * o[1] + dz * o[2] - cos_open * d)
    return c - r_out, c + r_out, sdf


def _sacrum(curve):
    """The sacrum, lofted slice by slice: wide alae at S1 narrowing to its tip, concave in front."""
    top, bottom = 98.0, 5.0

    def sdf(x, y, z):
        s = np.clip((top - z) / (top - bottom), 0.0, 1.0)
        yc = 50.0 + 42.0 * s + curve * 4.0 * s * (1.0 - s)
        half_w = 55.0 - 41.0 * _along(s, lambda v: v ** 0.8)
        half_t = (24.0 - 15.0 * s) * (1.0 - 0.45 * np.clip((np.abs(x) - 22.0) / np.maximum(half_w - 22.0, 1.0), 0, 1))
        q = np.sqrt(np.sqrt(np.square(np.square(x / half_w)) + np.square(np.square((y - yc) / half_t))))
        return np.maximum((q - 1.0) * half_t, np.maximum(z - top, bottom - z))
    return np.array([-56.0, 26.0, bottom]), np.array([56.0, 125.0, top]), sdf


def _sacral_canal(curve, z):
    """Where the sacral canal runs at height z: a third of the way back inside the bone."""
    s = min(max((98.0 - z) / 93.0, 0.0), 1.0)
    return (0.0, 50.0 + 42.0 * s + curve * 4.0 * s * (1.0 - s) + 0.45 * (24.0 - 15.0 * s), z)


class _Frame:
    """One scan's voxels in the case's pelvis frame (mm from the femoral heads' midpoint; x to the
    patient's left, y posterior, z superior) after the week's shift. Shapes are painted on this
    regular grid; :meth:`warp` then moves every voxel by the case's smooth deformation."""

    def __init__(self, spec: SynthSpec, anat: dict, shift_mm: np.ndarray):
        self.shape = spec.shape
        scale = np.asarray(anat["scale"])
        self.axes = [(((np.arange(n) - (n - 1) / 2) * s - d - o) / k).astype(np.float32)
                     for n, s, d, o, k in zip(spec.shape, spec.spacing, shift_mm, anat["origin"], scale)]
        self.q = [a.reshape([-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(self.axes)]
        self.step = np.asarray(spec.spacing) / scale
        self.waves = anat["waves"]

    def box(self, lo, hi):
        sl = tuple(slice(int(np.searchsorted(a, low)), int(np.searchsorted(a, high)))
                   for a, low, high in zip(self.axes, lo, hi))
        return sl, [q[tuple(s if i == j else slice(None) for j in range(3))]
                    for i, (q, s) in enumerate(zip(self.q, sl))]

    def warp(self, label: np.ndarray, kind: np.ndarray):
        """Label and tissue maps moved by the deformation (nearest voxel): each voxel takes what
        lies at its position plus the displacement, a sum of plane waves in the pelvis frame."""
        coords = np.indices(self.shape, np.float32)
        for axis, k, phase, amp in self.waves:
            wave = _plane_wave([k[i] * self.axes[i] + (phase if i == 0 else 0.0) for i in range(3)])
            coords[axis] += np.float32(amp / self.step[axis]) * wave
        code = kind.astype(np.uint16) * 8 + label
        moved = ndimage.map_coordinates(code, coords, order=0, mode="nearest")
        return (moved % 8).astype(np.uint8), (moved // 8).astype(np.uint8)

    def sdf(self, shape):
        """(box, signed distance) of a primitive."""
        lo, hi, fn = shape[:3]
        sl, (x, y, z) = self.box(lo, hi)
        return sl, np.broadcast_to(fn(x, y, z), tuple(t.stop - t.start for t in sl))

    def union(self, shapes) -> np.ndarray:
        """Signed distance of a union of primitives over the whole grid (large outside all)."""
        field = np.full(self.shape, 1e3, np.float32)
        for s in shapes:
            sl, d = self.sdf(s)
            if d.size:
                np.minimum(field[sl], d, out=field[sl])
        return field


class _Painter:
    """The label and tissue-kind maps of one scan, painted object by object (later wins)."""

    def __init__(self, frame: _Frame):
        self.frame = frame
        self.label = np.zeros(frame.shape, np.uint8)
        self.kind = np.zeros(frame.shape, np.uint8)
        self.subcutaneous: np.ndarray | None = None  # the body's fat under the skin, once painted

    def mask(self, sl, mask, kind, cls=None):
        if cls is not None:
            self.label[sl][mask] = cls
        self.kind[sl][mask] = TISSUES.index(kind)

    def solid(self, shape, kind, cls=None, inner=None, wall=0.0):
        """Paint a primitive; with ``inner``, voxels deeper than ``wall`` mm get that tissue."""
        sl, d = self.frame.sdf(shape)
        if d.size:
            self.mask(sl, d <= 0, kind, cls)
            if inner is not None:
                self.mask(sl, d <= -wall, inner)

    def bone(self, shapes, cortex=2.5):
        """A bone as the union of primitives: dark cortex around fatty marrow."""
        d = self.frame.union(shapes)
        self.mask(Ellipsis, d <= 0, "cortex", BONES)
        self.mask(Ellipsis, d <= -cortex, "marrow")


def render_volume(anat: dict, spec: SynthSpec, week_rng: np.random.Generator,
                  return_tissue: bool = False):
    """Render one weekly scan of a case: returns (image int16, label uint8).

    Args:
        anat: the case's anatomy from :func:`make_case_anatomy`.
        spec: grid shape and spacing.
        week_rng: randomness of this week (filling, bowel, shift, noise).
        return_tissue: also return a uint8 map of the tissue drawn at each voxel (an index into
            :data:`TISSUES`), before blur and noise.
    """
    n = week_rng.normal
    shift = np.array([n(0, 2.0), n(0, 2.0), n(0, 3.0)])
    frame = _Frame(spec, anat, shift)
    tex_rng = np.random.default_rng(week_rng.integers(2**32))
    level = np.array([mean + sd * tex_rng.standard_normal() for mean, sd in _T.values()], np.float32)
    paint = _Painter(frame)
    body = _paint_body_wall(paint, anat)
    _paint_muscles(paint, anat)
    _paint_bowel(paint, anat, week_rng)
    _paint_rectum(paint, anat, week_rng)
    _paint_bladder_and_prostate(paint, anat, week_rng)
    _paint_skeleton(paint, anat)
    label, kind = paint.label, paint.kind
    label[~body] = BACKGROUND
    kind[~body] = 0
    label, kind = frame.warp(label, kind)
    image = _acquire(level[kind], kind, spec, frame, anat, tex_rng)
    return (image, label, kind) if return_tissue else (image, label)


def _plane_wave(phases) -> np.ndarray:
    """sin(a + b + c) on the grid, from the phases a, b, c along each axis, by the angle-sum
    identity: sines and cosines in Python's math (1D), then products and sums only, each rounded
    as IEEE arithmetic is on every CPU (a complex product may use fused multiply-adds on one CPU
    and not on another)."""
    axes = [np.asarray(p, float) for p in phases]
    sin = [_along(p, math.sin).reshape([-1 if i == j else 1 for j in range(len(axes))]) for i, p in enumerate(axes)]
    cos = [_along(p, math.cos).reshape([-1 if i == j else 1 for j in range(len(axes))]) for i, p in enumerate(axes)]
    if len(axes) == 2:
        return sin[0] * cos[1] + cos[0] * sin[1]
    return ((sin[0] * cos[1]) * cos[2] + (cos[0] * sin[1]) * cos[2]
            + (cos[0] * cos[1]) * sin[2] - (sin[0] * sin[1]) * sin[2])


def _along(values, fn, dtype=np.float32):
    """``fn`` of each element of a small array, in Python's math: NumPy's vectorised
    transcendental functions differ in the last bits between CPUs (AVX2, AVX-512), and a label
    map must not, so shapes use them only through this (and otherwise + - * / sqrt)."""
    return np.array([fn(float(v)) for v in np.ravel(values)], dtype).reshape(np.shape(values))


def _ellipse_radius(x, y, rho, a, b):
    """Distance from the centre to the ellipse of semi-axes a (x) and b (y), in the direction of
    the point (x, y) at distance rho."""
    return rho / np.maximum(np.sqrt((x / a) ** 2 + (y / b) ** 2), 1e-6)


# The pelvic and lower abdominal cavity slice by slice (z in mm): half-width, front and back.
# Between it and the subcutaneous fat lie muscles; inside it viscera, vessels and pelvic fat.
_CAVITY_Z = np.array([-110.0, -75.0, -45.0, -15.0, 20.0, 60.0, 100.0, 150.0, 200.0])
_CAVITY_HALF_WIDTH = np.array([0.0, 32.0, 46.0, 52.0, 60.0, 74.0, 92.0, 98.0, 98.0])
_CAVITY_BACK = np.array([55.0, 62.0, 70.0, 76.0, 78.0, 70.0, 30.0, 12.0, 12.0])
_CAVITY_FRONT = np.array([-20.0, -30.0, -50.0, -46.0, -70.0, -200.0, -200.0, -200.0, -200.0])


def _paint_body_wall(paint: _Painter, anat: dict) -> np.ndarray:
    """The body outline slice by slice (hips, buttocks with the gluteal cleft, the thighs parting
    below the perineum), subcutaneous fat, and muscle between it and the pelvic cavity, divided
    by fat planes. Pelvic fat fills the cavity where no organ takes it. Returns the body mask."""
    x, y, z = paint.frame.q
    f = anat["fat"]
    yc = 22.0
    crotch = np.clip((z + 106.0) / 28.0, 0.0, 1.0)  # the trunk ends between the thighs
    rho = np.sqrt(x * x + (y - yc) ** 2)
    cos_front = (yc - y) / np.maximum(rho, 1e-3)  # 1 straight in front, -1 straight behind
    a = (158.0 + f) * (1.0 - 0.08 * np.clip((z - 40.0) / 80.0, 0.0, 1.0)) * crotch
    b = (108.0 + 0.9 * f) * anat["body_ap"] * crotch
    radius = _ellipse_radius(x, y - yc, rho, a + 1e-3, b + 1e-3)
    buttocks = np.clip(1.0 - ((cos_front + 0.74) / 0.4) ** 2, 0.0, 1.0) ** 2
    radius = radius + (12.0 + 0.5 * f) * _along(z, lambda v: math.exp(-((v + 25.0) / 50.0) ** 2)) * buttocks * crotch
    cleft = np.clip(1.0 - (x / 12.0) ** 2, 0.0, 1.0) * (y > yc)
    radius = radius - (30.0 + f) * np.clip((-5.0 - z) / 40.0, 0.0, 1.0) * cleft
    depth = radius - rho
    fat_trunk = f * (1.0 + 0.45 * np.clip(-cos_front, 0.0, None))
    inner = depth > fat_trunk
    zf = z.ravel()
    half_w = np.interp(zf, _CAVITY_Z, _CAVITY_HALF_WIDTH).reshape(z.shape)
    front = np.maximum(np.interp(zf, _CAVITY_Z, _CAVITY_FRONT).reshape(z.shape), yc - b + f + 12.0)
    back_y = np.interp(zf, _CAVITY_Z, _CAVITY_BACK).reshape(z.shape)
    cy, cb = (front + back_y) / 2, np.maximum((back_y - front) / 2, 1e-3)
    cavity = (x / (half_w + 1e-3)) ** 2 + ((y - cy) / cb) ** 2 <= 1.0
    muscle = inner & ~cavity
    grow = np.sqrt(np.clip((-20.0 - z) / 40.0, 0.0, 1.0))
    for side in (-1, 1):
        tx, ty = x - side * 106.0, y - 8.0
        rho_t = np.sqrt(tx * tx + ty * ty)
        d_t = _ellipse_radius(tx, ty, rho_t, (62.0 + 0.7 * f) * grow + 1e-3, (70.0 + 0.8 * f) * grow + 1e-3) - rho_t
        depth = np.maximum(depth, d_t)
        muscle |= (d_t > 0.7 * f) & (z < -45.0)
    # fat planes between muscle groups: where a smooth random field of the axial plane crosses
    # zero (wavy lines about 3.5 mm thick), and the plane under gluteus maximus
    field = sum(_plane_wave([kx * x.ravel() + ph, ky * y.ravel()])[..., None]
                for kx, ky, ph in anat["fat_planes"])
    muscle &= np.abs(field) > 1.8 * 2 * math.pi / 100.0 * 1.2
    under_glut = fat_trunk + 30.0 * _along(z, lambda v: math.exp(-((v + 5.0) / 55.0) ** 2))
    muscle &= ~((cos_front < -0.32) & (np.abs(depth - under_glut) < 1.8))
    body = depth >= 0
    every = (slice(None),) * 3
    paint.mask(every, body, "fat", BODY)
    paint.mask(every, np.broadcast_to(muscle, paint.frame.shape), "muscle")
    paint.subcutaneous = body & ~inner
    return body


def _paint_muscles(paint: _Painter, anat: dict) -> None:
    """Iliopsoas, iliacus, the gluteus medius and minimus, obturator internus and externus,
    piriformis, the erector spinae and the levator ani; subcutaneous fat stays fat."""
    shapes = []
    for s in (-1, 1):
        shapes += [
            _capsules([(s * 28, 32, 175), (s * 40, 28, 130), (s * 55, 10, 85), (s * 68, -14, 42),
                       (s * 82, -30, 10), (s * 97, -30, -20), (s * 114, 2, -55)], [14, 19, 22, 21, 17, 14, 9]),
            _capsules([(s * 56, -30, -28), (s * 58, -5, -12), (s * 56, 22, -22), (s * 52, 34, -40)], [10, 12, 12, 9]),
            _capsules([(s * 56, 34, -30), (s * 95, 40, -20), (s * 128, 26, -18)], 6),
            _capsules([(s * 22, 82, 48), (s * 60, 66, 30), (s * 95, 44, 8), (s * 128, 24, -8)], [10, 13, 11, 7]),
        ]
        wing = _wing(s)
        c, eu, ev, medial = wing["centre"], wing["eu"], wing["ev"], wing["medial"]
        shapes.append(_plate(c + medial * 13, eu, ev, (64, 44), (14, 20), wing["bend"]))   # iliacus
    for shape in shapes:
        paint.solid(shape, "muscle")
    # levator ani: a funnel from the pelvic side walls to the anorectal junction
    lo, hi = np.array([-75.0, -35.0, -66.0]), np.array([75.0, 80.0, -8.0])
    sl, (x, y, z) = paint.frame.box(lo, hi)
    r = 16.0 + 40.0 * np.clip((z + 64.0) / 54.0, 0.0, 1.0)
    funnel = (np.abs(np.sqrt((x / 1.15) ** 2 + (y - 18.0) ** 2) - r) < 3.0) & (y > -30.0) & (z > -64) & (z < -10)
    paint.mask(sl, funnel, "muscle")
    paint.kind[paint.subcutaneous & (paint.kind == TISSUES.index("muscle"))] = TISSUES.index("fat")
    for s in (-1, 1):  # external iliac and femoral vessels (dark flow voids), the veins beside them
        path = np.array([(s * 38, 10, 150), (s * 52, -8, 95), (s * 66, -36, 40), (s * 78, -52, 5),
                         (s * 82, -56, -25), (s * 80, -50, -110)])
        paint.solid(_capsules(path - (s * 9, -2, 0), 6.5), "vein")
        paint.solid(_capsules(path, 4.5), "vessel")
        paint.solid(_capsules([(s * 45, 5, 100), (s * 50, 35, 60), (s * 48, 50, 30)], 3.5), "vessel")


def _wing(s: int) -> dict:
    eu = _unit((s * 0.55, -0.83, 0.05))
    ev = np.array([s * 0.35, 0.0, 0.94])
    c = np.array([s * 94.0, 16.0, 80.0])
    lo, hi, fn, ew = _plate(c, eu, ev, (72, 46), (10, 16), 0.0)
    medial = ew if ew[0] * s < 0 else -ew
    return {"centre": c, "eu": eu, "ev": ev, "medial": medial, "bend": 0.003 * float(np.sign(medial @ ew))}


def _paint_bowel(paint: _Painter, anat: dict, week_rng: np.random.Generator) -> None:
    """Small-bowel loops above the bladder (new each week) and the sigmoid winding from the
    rectum: a dark wall around fluid, gas or chyme (class body)."""
    rng = week_rng
    lo, hi = np.array([-85.0, -90.0, 55.0]), np.array([85.0, 20.0, 170.0])
    for _ in range(int(rng.integers(3, 7))):
        p = rng.uniform(lo, hi)
        d = _unit(rng.normal(size=3))
        pts = [p]
        for _ in range(5):
            d = _unit(d + 0.8 * rng.normal(size=3))
            p = np.clip(p + 22.0 * d, lo, hi)
            pts.append(p)
        content = ("fluid", "bowel", "gas", "bowel")[int(rng.integers(4))]
        paint.solid(_capsules(pts, rng.uniform(10, 15)), "bowel_wall", inner=content, wall=2.5)
    top = _rectum_path(anat)[-1]
    pts = [top, top + (18, -12, 14)] + [np.array(p) + j for p, j in
                                        zip([(45, -20, 70), (35, -55, 78), (0, -50, 85), (-25, -15, 95), (-5, 25, 110)],
                                            anat["sigmoid"])]
    paint.solid(_capsules(pts, 15.0), "rectal_wall", inner=("stool", "gas")[int(rng.random() < 0.3)], wall=3.0)


def _rectum_path(anat: dict) -> np.ndarray:
    x0, x1, x2, x3 = anat["rectum_x"]
    return np.array([(0, 40, -98), (0, 29, -66), (x0, 20, -44), (x1, 30, -18), (x2, 44, 8), (x3, 50, 32), (0, 46, 55)],
                    float)


def _paint_rectum(paint: _Painter, anat: dict, week_rng: np.random.Generator) -> None:
    """From the collapsed anal canal up the sacral curve: the ampulla's width follows the week's
    filling, stool of varying size inside, gas rising to the front (the patient lies supine)."""
    fill = float(np.clip(week_rng.normal(1.0, 0.18), 0.7, 1.4))
    rr = anat["rectum_r"]
    path = _rectum_path(anat)
    outer = np.array([8, 10, 13, rr * fill, (rr + 2) * fill, (rr - 1) * fill, 14])
    lumen = np.maximum(outer - 3.5, 1.0)
    lumen[0] = 1.0
    paint.solid(_capsules(path, outer), "rectal_wall", RECTUM)
    lo, hi, fn = _capsules(path, lumen)
    sl, (x, y, z) = paint.frame.box(lo, hi)
    inside = np.broadcast_to(fn(x, y, z) <= 0, tuple(t.stop - t.start for t in sl))
    paint.mask(sl, inside, "stool")
    gas_level = week_rng.uniform(-1.0, 0.6)  # how far back (in lumen radii) the gas reaches
    centre_y = np.interp(z, path[::-1, 2], path[::-1, 1])
    radius = np.interp(z, path[::-1, 2], lumen[::-1])
    paint.mask(sl, inside & (y < centre_y + gas_level * radius) & (z > -50), "gas")
    for _ in range(int(week_rng.integers(0, 4))):  # gas bubbles in the stool
        c = path[int(week_rng.integers(2, 6))] + week_rng.normal(0, 5, 3)
        bubble = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= week_rng.uniform(3, 8) ** 2
        paint.mask(sl, inside & bubble, "gas")


def _paint_bladder_and_prostate(paint: _Painter, anat: dict, week_rng: np.random.Generator) -> None:
    """Seminal vesicles; the bladder, its shape following the week's filling (flattened and
    dented on top when nearly empty, rounder when full), on the prostate with its zones: a
    bright peripheral zone behind and at the apex, the transition zone with nodules, dark
    fibromuscular stroma in front."""
    ps = anat["prostate"]
    px, py, pz = anat["prostate_at"]
    semi_p = np.array([29.0, 21.0, 25.0]) * ps
    for s in (-1, 1):
        paint.solid(_capsules([(px + s * 4, py + 12, pz + 16), (px + s * 16, py + 24, pz + 26),
                               (px + s * 32, py + 26, pz + 32), (px + s * 42, py + 22, pz + 33)], [5, 7, 7, 5]),
                    "seminal")
    volume = anat["bladder_ml"] * float(np.clip(week_rng.normal(0.9, 0.35), 0.25, 1.6)) * 1000.0
    round_ = min(volume / 300000.0, 1.0)
    q = 0.55 + 0.4 * round_
    k = (volume / (4 / 3 * math.pi * 1.3 * q)) ** (1 / 3)
    a, b, c = 1.3 * k, k, q * k
    centre = np.array([px, -46.0 + 0.92 * b, pz + 0.8 * semi_p[2] + 0.75 * c])
    dent = 0.8 * max(0.0, 0.7 - round_)
    wall = 2.5 + 2.0 * (1.0 - round_)

    def bladder(x, y, z):
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        e = (dx / a) ** 2 + (dy / b) ** 2
        dz = dz + dent * c * np.clip(1.0 - e, 0.0, 1.0) ** 2 * (dz > 0)
        return (np.sqrt(e + (dz / c) ** 2) - 1.0) * min(a, b, c)
    ext = np.array([a, b, c])
    paint.solid((centre - ext, centre + ext, bladder), "bladder_wall", BLADDER, inner="urine", wall=wall)
    pc = np.array([px, py, pz])

    def prostate(x, y, z):
        dz = (z - pz) / semi_p[2]
        taper = 0.72 + 0.28 * np.clip((dz + 1) / 2, 0, 1)
        return np.sqrt(((x - px) / (semi_p[0] * taper)) ** 2 + ((y - py) / (semi_p[1] * taper)) ** 2 + dz * dz)
    sl, (x, y, z) = paint.frame.box(pc - semi_p, pc + semi_p)
    e = prostate(x, y, z)
    gland = e <= 1.0
    paint.mask(sl, gland, "prostate_tz", PROSTATE)
    yy, zz = (y - py) / semi_p[1], (z - pz) / semi_p[2]
    paint.mask(sl, gland & (((e > 1 - 6.0 / semi_p[1]) & (yy > -0.15)) | ((zz < -0.45) & (e > 0.45))), "prostate_pz")
    for u, v, w, r in anat["nodules"]:
        cn = pc + np.array([u, v, w]) * semi_p * 0.6
        d = np.sqrt(((x - cn[0]) / (r * semi_p[0])) ** 2 + ((y - cn[1]) / (r * semi_p[1])) ** 2
                    + ((z - cn[2]) / (r * semi_p[2])) ** 2)
        paint.mask(sl, gland & (d <= 1.0) & (e < 0.8), "nodule")
    paint.mask(sl, gland & (yy < -0.55) & (e > 0.55), "prostate_stroma")


def _paint_skeleton(paint: _Painter, anat: dict) -> None:
    """Femora in the acetabula (a thin layer of cartilage between), the hip bones as the ring
    they are (iliac wings, acetabula, pubic rami meeting at the symphysis, ischia), sacrum and
    coccyx, the lowest lumbar vertebrae with their discs and the spinal canal."""
    r = anat["fh_r"]
    for s in (-1, 1):
        head = (s * 95.0, 0.0, 0.0)
        paint.solid(_ellipsoid(head, [r + 2.5] * 3), "cartilage")
        paint.bone([_ellipsoid(head, [r] * 3),
                    _capsules([head, (s * 132, 6, -28)], [16, 17]),
                    _ellipsoid((s * 145, 12, -20), (15, 18, 20)),
                    _capsules([(s * 135, 6, -35), (s * 129, 4, -120), (s * 119, 0, -220)], [17, 14, 13]),
                    _capsules([(s * 125, 10, -55), (s * 111, 18, -58)], [9, 6])], cortex=3.0)
        wing = _wing(s)
        paint.bone([_cup(head, r + 2.5, r + 12.5, (s * 0.72, -0.3, -0.62), 0.26),
                    _capsules([(s * 72, 12, 22), (s * 70, 30, 58), (s * 52, 62, 72)], [17, 16, 14]),
                    _plate(wing["centre"], wing["eu"], wing["ev"], (72, 46), (10, 16), wing["bend"])[:3],
                    _capsules([(s * 122, -40, 68), (s * 128, 0, 100), (s * 110, 40, 105), (s * 60, 70, 80)],
                              [7, 8, 8, 10]),
                    _capsules([(s * 74, -22, -2), (s * 45, -45, -14), (s * 17, -56, -22)], [12, 10, 10]),
                    _ellipsoid((s * 13, -56, -33), (9, 12, 19)),
                    _capsules([(s * 15, -50, -48), (s * 35, -28, -63), (s * 52, 2, -66), (s * 58, 24, -56)],
                              [8, 8, 9, 15]),
                    _capsules([(s * 58, 24, -56), (s * 66, 24, -25), (s * 72, 18, -5)], [15, 15, 16]),
                    _capsules([(s * 62, 30, -18), (s * 46, 40, -20)], [7, 4])])
    curve = anat["sacrum_curve"]
    paint.bone([_sacrum(curve), _capsules([(0, 92, 5), (0, 86, -15), (0, 74, -30)], [9, 7, 5])])
    vertebrae = [_ellipsoid((0, 32, 125), (25, 19, 13)), _ellipsoid((0, 26, 163), (25, 19, 13))]
    for zv in (125.0, 163.0):
        vertebrae += [_capsules([(s * 10, 50, zv), (s * 14, 66, zv - 2), (0, 74, zv - 4)], 6) for s in (-1, 1)]
        vertebrae.append(_capsules([(0, 74, zv - 4), (0, 100, zv - 14)], 7))
    paint.bone(vertebrae)
    paint.solid(_ellipsoid((0, 38, 106), (23, 17, 5.5)), "disc")
    paint.solid(_ellipsoid((0, 28, 144), (24, 18, 5.5)), "disc")
    paint.solid(_capsules([(0, 60, 190), (0, 60, 110), _sacral_canal(curve, 90), _sacral_canal(curve, 45)],
                          [9, 8, 6, 3]), "csf")


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / np.float32(field.std(dtype=np.float64) + 1e-6)  # float64: the same on every CPU


def _acquire(tissue, kind, spec: SynthSpec, cv: _Frame, anat: dict, rng: np.random.Generator) -> np.ndarray:
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
    nx, ny, nz = shape
    deep = int(round(nz * 144 / 128))
    cases = []
    for i in range(n_cases):
        depth = deep if rng.random() < 0.2 else nz
        sxy = float(rng.uniform(1.7, 1.9)) * 256 / nx
        sz = float(rng.uniform(1.5, 2.5)) * 128 / nz
        if depth != nz:
            sz = sz * nz / depth * 1.05
        n_weeks = int(rng.integers(weeks_range[0], weeks_range[1] + 1))
        weeks = sorted(rng.choice(np.arange(8), size=n_weeks, replace=False).tolist())
        cases.append({"case": f"{4 + i * 3:03d}", "shape": (nx, ny, depth), "spacing": (sxy, sxy, sz),
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
            raise OutputExists(out)
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
        workers = workers or min(available_cpus(), len(jobs))
        if workers > 1:
            torch = sys.modules.get("torch")  # synth never imports it; its caller may have
            start = "spawn" if torch is not None and torch.cuda.is_initialized() else None
            with ProcessPoolExecutor(workers, get_context(start)) as pool:  # a fork cannot use CUDA
                list(pool.map(_write_case, jobs))
        else:
            for j in jobs:
                _write_case(j)
        meta = {"generator": "hipseg synth", "version": __version__, "anatomy": ANATOMY, "seed": seed,
                "cases": cases, "shape": list(shape), "weeks": list(weeks), "classes": list(CLASS_NAMES),
                "volumes": sum(len(j["weeks"]) for j in jobs)}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def anatomy_of(folder: str | os.PathLike) -> int | None:
    """The anatomy generation a set made by :func:`make_dataset` records (:data:`ANATOMY`; 1 for
    sets from before it was recorded), or ``None`` for a folder that is not such a set.

    Example:
        >>> anatomy_of("data/synthetic") == ANATOMY  # doctest: +SKIP
        True
    """
    try:
        meta = json.loads((Path(folder) / "synth.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("generator") != "hipseg synth":
        return None
    return int(meta.get("anatomy", 1))
