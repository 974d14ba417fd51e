"""Running the tutorial book: execute chapters with papermill, build the HTML, the landing page.

``make book`` calls :func:`run_book` through ``hipseg book``. Chapters are executed in
table-of-contents order into ``_build/executed/`` (the committed notebooks stay free of
outputs), then ``jupyter-book build`` publishes those executed copies with execution off.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import HipsegError, first_line
from ._atomic import atomic_path
from .locations import ensure_default_dataset, project_root

__all__ = ["chapters", "BookPlan", "run_book", "execute_chapter", "build_html", "write_landing", "publishing_config",
           "check_answer", "version_banner",
           "start_here"]


def chapters(root: Path | None = None) -> list[Path]:
    """Notebooks listed in ``_toc.yml``, in order."""
    root = root or project_root()
    toc = root / "_toc.yml"
    if not toc.exists():
        raise HipsegError(f"{toc}: no table of contents")
    files = re.findall(r"^\s*-?\s*(?:file|root):\s*(\S+)", toc.read_text(), re.M)
    out = []
    for f in files:
        nb = root / (f if f.endswith(".ipynb") else f + ".ipynb")
        if nb.exists():
            out.append(nb)
    return out


def execute_chapter(notebook: Path, output: Path, parameters: dict, timeout: int = 3600) -> float:
    """Execute one chapter with papermill (only the parameters it declares); returns seconds."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    assigned = _parameter_names(notebook)
    unparsed = sorted(assigned - set(declared))
    if unparsed:
        raise HipsegError(f"{notebook}: papermill cannot parse parameter(s) {', '.join(unparsed)} "
                          "(keep each on one line; no quotes in its comment)")
    params = {k: v for k, v in parameters.items() if k in declared}
    output.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=params, cwd=str(notebook.parent),
                            kernel_name=_kernel_name(), progress_bar=False, execution_timeout=timeout,
                            kernel_manager_class=_quiet_kernel_manager())
    except pm.PapermillExecutionError as exc:
        raise HipsegError(f"{notebook.name}: cell {exc.exec_count} raised {exc.ename}: "
                          f"{first_line(exc.evalue) if exc.evalue else ''} (see {output})") from None
    _tidy_executed(output)
    return time.perf_counter() - t


def _tidy_executed(path: Path) -> None:
    """Keep the build machine out of an executed chapter (the .ipynb a reader downloads).

    papermill's injected-parameters cell is tagged ``remove-cell`` (it ran; the page does not show
    it) and loses its assignments of absolute paths, so a downloaded copy runs with the chapter's
    own defaults; papermill's metadata loses the notebook's input and output paths and those
    parameters."""
    import ast

    import nbformat

    def local(value) -> bool:
        return isinstance(value, str) and os.path.isabs(value)

    def sets_local_path(line: str) -> bool:
        try:
            node = ast.parse(line).body
        except SyntaxError:
            return False
        return (len(node) == 1 and isinstance(node[0], ast.Assign)
                and isinstance(node[0].value, ast.Constant) and local(node[0].value.value))

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" not in tags:
            continue
        if "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
        lines = cell.source.splitlines()
        kept = [line for line in lines if not sets_local_path(line)]
        if len(kept) < len(lines):
            kept.append("# (the build machine's folders left out: the defaults above apply)")
        cell.source = "\n".join(kept)
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        meta.pop(key, None)
    meta["parameters"] = {k: v for k, v in meta.get("parameters", {}).items() if not local(v)}
    nbformat.write(nb, str(path))


def _quiet_kernel_manager():
    """A kernel manager that does not fill ``make book``'s output with false alarms.

    - IPC transport (local socket files) instead of TCP: ipykernel warns on every start that TCP
      carries code and outputs in plain text; nothing listens on a port this way.
    - No interrupt before the shutdown request: jupyter_client interrupts a kernel it shuts down,
      and a kernel that is inside a message handler then logs "ERROR | KeyboardInterrupt caught
      in kernel" although nothing went wrong. The shutdown request alone ends it (and a kernel
      that does not end in time is still terminated).
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class QuietKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return QuietKernelManager


def _kernel_name() -> str:
    """The project's own kernel (``make setup`` registers ``hipseg`` in .venv), else ``python3``.

    A dedicated name keeps a ``python3`` kernel registered elsewhere (e.g. in ~/.local) from
    running the chapters with an interpreter that lacks hipseg_lib.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    return "hipseg" if "hipseg" in specs else "python3"


def _parameter_names(notebook: Path) -> set[str]:
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    names: set[str] = set()
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            names |= set(re.findall(r"^([A-Za-z_]\w*)\s*=", cell.source, re.M))
    return names


LANDING_MD = "landing.md"
LANDING_PNG = "landing.png"


def write_landing(results_dir: str | os.PathLike, figure, rows: Sequence[dict], note: str) -> Path:
    """Save the result that the book's first page shows: ``figure`` (a matplotlib figure) and a
    markdown table of ``rows`` under ``note``, into ``results_dir`` (chapter 5 calls this)."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / LANDING_PNG, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    cols = list(rows[0])
    lines = [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]
    text = (f":::{{div}} full-width\n![A test scan, its truth and the prediction]({LANDING_PNG})\n:::\n\n"
            f"{note}\n\n" + "\n".join(lines) + "\n")
    with atomic_path(out / LANDING_MD, suffix=".md") as tmp:
        Path(tmp).write_text(text)
    return out / LANDING_MD


def publishing_config(config: dict, repository: str, branch: str = "main") -> dict:
    """``config`` (the parsed ``_config.yml``) with Jupyter Book's ``repository`` block for
    ``repository`` and its buttons on: the repository link, Binder and Colab launch buttons (Colab
    only for a GitHub repository), the .ipynb download. Without a repository the book has none of
    them, so a local build links nowhere it cannot reach."""
    url = repository.rstrip("/")
    out = {**config, "repository": {"url": url, "path_to_book": "", "branch": branch}}
    launch = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org"}
    if url.startswith("https://github.com/"):
        launch["colab_url"] = "https://colab.research.google.com"
    out["launch_buttons"] = launch
    out["html"] = {**config.get("html", {}), "use_repository_button": True, "use_download_button": True}
    return out


def start_here(repository: str | None) -> str:
    """The landing page's "Start here" commands: how to get the code (its URL when the book knows its
    repository) and the three ``make`` targets; launch buttons are mentioned only when the book has them.

    Example:
        >>> "git clone https://github.com/someone/hipseg" in start_here("https://github.com/someone/hipseg")
        True
        >>> "launch" in start_here(None), "git clone" in start_here(None)  # no address to give
        (False, False)
    """
    url = (repository or "").rstrip("/")
    lines = []
    if url:
        lines += ["```bash", f"git clone {url} hipseg", "cd hipseg"]
    else:  # a book built from a local copy knows no address to clone from
        lines += ["In the folder of the copy of hipseg these pages were built from (the one that holds "
                  "`Makefile`, `book/` and `hipseg_lib/`), on Linux with Python 3.11:", "", "```bash"]
    lines += ["make book   # sets up .venv, makes the data, runs every chapter, builds this HTML",
              "make lab    # JupyterLab on the chapters, to run and change them yourself",
              "make test   # the whole test suite", "```", ""]
    if url:
        where = "Binder or Colab" if url.startswith("https://github.com/") else "Binder"
        lines += [f"The code is at <{url}>: the chapters in `book/`, the library they import in "
                  f"`hipseg_lib/`. The launch button at the top of each chapter (the rocket) opens it on "
                  f"{where}, where its first cell installs hipseg."]
    else:
        lines += ["The chapters are the notebooks in its `book/` folder, and the library they import "
                  "is its `hipseg_lib/` folder."]
    return "\n".join(lines) + "\n"


def stage_sources(root: Path, stage: Path, results_dir: Path | None = None, repository: str | None = None) -> None:
    """Copy the book's non-notebook sources (config, toc, markdown, images, bibliography) and the
    library's source (the chapters show it with ``literalinclude``) beside the executed copies; write
    the landing page's result (``book/_landing.md``) from ``results_dir`` and its "Start here"
    (``book/_start.md``, :func:`start_here`); with ``repository``, the config gets
    :func:`publishing_config`."""
    import yaml

    stage.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        shutil.copy2(root / name, stage / name)
    if repository:
        config = yaml.safe_load((root / "_config.yml").read_text())
        (stage / "_config.yml").write_text(yaml.safe_dump(publishing_config(config, repository), sort_keys=False))
    if (root / "_static").is_dir():
        shutil.copytree(root / "_static", stage / "_static", dirs_exist_ok=True)
    (stage / "hipseg_lib").mkdir(exist_ok=True)
    for src in (root / "hipseg_lib").glob("*.py"):
        shutil.copy2(src, stage / "hipseg_lib" / src.name)
    (stage / "book").mkdir(exist_ok=True)
    (stage / "book" / "_start.md").write_text(start_here(repository))
    for src in (root / "book").rglob("*"):
        if src.is_file() and src.suffix != ".ipynb" and ".ipynb_checkpoints" not in src.parts:
            dst = stage / src.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    landing = stage / "book" / "_landing.md"
    if results_dir is not None and (results_dir / LANDING_MD).exists() and (results_dir / LANDING_PNG).exists():
        shutil.copy2(results_dir / LANDING_PNG, stage / "book" / LANDING_PNG)
        landing.write_text((results_dir / LANDING_MD).read_text())
    else:
        landing.write_text("*The result of this book's run appears here once chapter 5 has run "
                           "(`make book`).*\n")


def build_html(source: Path, output: Path, strict: bool = True) -> Path:
    """``jupyter-book build`` of ``source`` into ``output/_build/html`` (warnings are errors when strict)."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(source), "--path-output", str(output)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise HipsegError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    return output / "_build" / "html"


@dataclass(frozen=True)
class BookPlan:
    """What one book run executes: the settings the chapters receive and where their outputs go.

    Attributes:
        preset: ``smoke``, ``cpu``, ``full`` or ``auto`` (``full`` with CUDA, else ``cpu``).
        data_dir: real data folder; default ``$HIPSEG_DATA`` or the synthetic set (made if missing).
        precision: the chapters' precision (``auto``, ``bf16``, ``fp16`` or ``fp32``: the fp32 path, as a
            CPU without native bf16 runs it); None: ``auto``.
        chapters: execute only these chapter stems (e.g. ``("01_data_exploration",)``); None: all.
        model_dir, results_dir: where chapter 4 saves checkpoints and chapter 5 its metrics
            (default ``<root>/model`` and ``<root>/results``).
        repository: the book's public repository URL (the publishing workflow passes its own):
            launch, repository and download buttons (:func:`publishing_config`); None: none.
    """

    preset: str = "auto"
    data_dir: str | None = None
    precision: str | None = None
    chapters: Sequence[str] | None = None
    model_dir: str | None = None
    results_dir: str | None = None
    repository: str | None = None


def run_book(plan: BookPlan | None = None, *, build: bool = True, root: Path | None = None,
             build_dir: Path | None = None, log=print) -> Path:
    """Execute every chapter in order with papermill, then build the HTML book.

    Args:
        plan: what to execute (:class:`BookPlan`; default: every chapter, preset ``auto``).
        build: run ``jupyter-book build`` after executing.
        root: the project folder (default :func:`project_root`).
        build_dir: where ``executed/`` and ``html/`` go (default ``<root>/_build``).
        log: where progress lines go.

    Returns:
        The HTML folder (or the executed-notebook folder when ``build`` is false).
    """
    from .config import make_config

    root = (root or project_root()).resolve()
    build_dir = (build_dir or root / "_build").resolve()
    plan = plan or BookPlan()
    stage = build_dir / "executed"
    nbs = chapters(root)
    if plan.chapters:  # checked before anything slow (the default data set) happens
        wanted = set(plan.chapters)
        unknown = wanted - {nb.stem for nb in nbs}
        if unknown:
            raise HipsegError(f"unknown chapter(s): {', '.join(sorted(unknown))}; "
                              f"choose from {', '.join(nb.stem for nb in nbs)}")
        nbs = [nb for nb in nbs if nb.stem in wanted]
    preset, precision = make_config(plan.preset).preset, plan.precision
    data = ensure_default_dataset(plan.data_dir)
    params = {"preset": preset, "data_dir": str(data), "live_widgets": False,
              "model_dir": str(Path(plan.model_dir).resolve()) if plan.model_dir else str(root / "model"),
              "results_dir": str(Path(plan.results_dir).resolve()) if plan.results_dir
              else str(root / "results")}
    if precision is not None:
        params["precision"] = precision
    log(f"book: preset {preset}" + (f", precision {precision}" if precision else "")
        + f", data {data}, {len(nbs)} chapter(s)")
    total = time.perf_counter()
    for nb in nbs:
        out = stage / nb.relative_to(root)
        log(f"  executing {nb.relative_to(root)} ...")
        secs = execute_chapter(nb, out, params)
        log(f"  {nb.stem}: {secs:.0f} s")
    stage_sources(root, stage, Path(str(params["results_dir"])), plan.repository)
    if not build:
        return stage
    missing = [nb for nb in chapters(root) if not (stage / nb.relative_to(root)).exists()]
    if missing:
        raise HipsegError(f"cannot build: not executed yet: {', '.join(m.stem for m in missing)}")
    html = build_html(stage, build_dir.parent if build_dir.name == "_build" else build_dir)
    log(f"book built in {time.perf_counter() - total:.0f} s: {html / 'index.html'}")
    return html


def _same(got, want, tolerance: float) -> bool:
    """Whether two results agree: arrays, tensors and numbers to ``tolerance``, tuples and lists
    element by element, anything else by ``==``."""
    import numpy as np

    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(
            _same(g, w, tolerance) for g, w in zip(got, want))
    if hasattr(want, "detach"):  # a torch tensor
        want = want.detach().cpu().numpy()
    if hasattr(got, "detach"):
        got = got.detach().cpu().numpy()
    if isinstance(want, (np.ndarray, float, int, np.number)):
        got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
        return got.shape == want.shape and bool(np.allclose(got, want, atol=tolerance, rtol=0, equal_nan=True))
    return bool(got == want)


def check_answer(yours, answer, reference, cases,
                 tolerance: float = 1e-6) -> bool:
    """An exercise's check: ``yours`` (the reader's function) beside
    ``reference`` (the library's) on each of ``cases`` (argument tuples);
    prints ``pass`` or the first case where they differ, and returns whether
    they agree. While ``yours`` still raises ``NotImplementedError``,
    ``answer`` (the chapter's folded answer) is checked in its place and the
    output says so."""
    name = getattr(yours, "__name__", "your function")
    library = getattr(reference, "__qualname__", "the library's")
    try:
        yours(*cases[0])
        checked = yours
        print(f"checking your {name} against {library}")
    except NotImplementedError:
        checked = answer
        print(f"{name} is not written yet: checking the folded answer")
    for k, args in enumerate(cases, 1):
        got, want = checked(*args), reference(*args)
        if not _same(got, want, tolerance):
            print(f"FAIL on case {k} of {len(cases)}:\n  it gives {got!r}\n"
                  f"  {library} gives {want!r}")
            return False
    print(f"pass: {len(cases)} of {len(cases)} cases agree with {library}")
    return True


def version_banner() -> str:
    """The versions a build ran with, on two lines (the appendix prints it)."""
    import platform

    import matplotlib
    import nibabel
    import numpy
    import torch

    from . import __version__

    first = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"nibabel {nibabel.__version__}"]
    second = [f"numpy {numpy.__version__}", f"matplotlib {matplotlib.__version__}", f"hipseg {__version__}"]
    return " | ".join(first) + "\n" + " | ".join(second)
