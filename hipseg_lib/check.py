"""``hipseg check``: audit a data folder and list every problem with its file name."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import CLASS_NAMES, NUM_CLASSES, HipsegError
from .io import find_pairs, load_volume, pair_problems

__all__ = ["AuditRow", "Audit", "audit_folder", "format_audit"]


@dataclass
class AuditRow:
    """One pair as read from disk."""

    id: str
    case: str
    shape: tuple
    spacing: tuple
    orientation: str
    image_dtype: str
    label_dtype: str
    class_voxels: list[int]


@dataclass
class Audit:
    root: Path
    rows: list[AuditRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def volumes_per_case(self) -> dict[str, int]:
        return dict(sorted(Counter(r.case for r in self.rows).items()))


def audit_folder(root: str | os.PathLike, progress: bool = False) -> Audit:
    """Read every pair under ``root`` and collect facts and problems (does not stop at the first).

    Raises:
        HipsegError: only when ``root`` itself is unusable (missing, empty of NIfTI files).
    """
    search = find_pairs(root)
    audit = Audit(Path(root), problems=list(search.problems))
    if not search.pairs:
        audit.problems.append(f"{root}: no image/label pairs found")
    pairs = search.pairs
    if progress:
        from .progress import progress as tqdm
        pairs = tqdm(pairs, desc="check", unit="pair", leave=False)
    for pair in pairs:
        try:
            image = load_volume(pair.image, "image")
        except HipsegError as exc:
            audit.problems.append(str(exc))
            continue
        try:
            label = load_volume(pair.label, "label")
        except HipsegError as exc:
            audit.problems.append(str(exc))
            continue
        audit.problems.extend(pair_problems(image, label))
        counts = np.bincount(label.array.ravel(), minlength=NUM_CLASSES).tolist()
        audit.rows.append(AuditRow(str(pair.id), pair.id.case, image.shape,
                                   tuple(round(s, 3) for s in image.spacing), image.orientation,
                                   str(image.header.get_data_dtype()), str(label.header.get_data_dtype()),
                                   counts))
    return audit


def format_audit(audit: Audit, max_rows: int = 20) -> str:
    """A readable summary: per-pair table (first ``max_rows``), totals, and every problem."""
    lines = [f"{audit.root}: {len(audit.rows)} pairs read, {len(audit.volumes_per_case)} cases, "
             f"{len(audit.problems)} problem(s)"]
    head = f"{'pair':<22}{'shape':<18}{'spacing (mm)':<22}{'orient':<8}{'image':<9}{'label':<8}"
    lines += ["", head, "-" * len(head)]
    for r in audit.rows[:max_rows]:
        lines.append(f"{r.id:<22}{'x'.join(map(str, r.shape)):<18}"
                     f"{'x'.join(f'{s:g}' for s in r.spacing):<22}{r.orientation:<8}"
                     f"{r.image_dtype:<9}{r.label_dtype:<8}")
    if len(audit.rows) > max_rows:
        lines.append(f"... {len(audit.rows) - max_rows} more")
    if audit.rows:
        shapes = Counter("x".join(map(str, r.shape)) for r in audit.rows)
        lines += ["", "shapes: " + ", ".join(f"{s} ({n})" for s, n in shapes.most_common())]
        total = np.sum([r.class_voxels for r in audit.rows], axis=0)
        frac = total / total.sum()
        lines.append("class voxels: " + ", ".join(
            f"{n} {100 * f:.3f}%" for n, f in zip(CLASS_NAMES, frac)))
        missing = {CLASS_NAMES[k]: sum(1 for r in audit.rows if r.class_voxels[k] == 0)
                   for k in range(NUM_CLASSES)}
        lines.append("pairs missing a class: " + ", ".join(f"{k} {v}" for k, v in missing.items()))
        per_case = audit.volumes_per_case
        lines.append(f"volumes per case: min {min(per_case.values())}, max {max(per_case.values())}, "
                     f"mean {np.mean(list(per_case.values())):.1f}")
    lines.append("")
    if audit.problems:
        lines.append(f"{len(audit.problems)} problem(s):")
        lines += [f"  {p}" for p in audit.problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)
