"""Every chapter executes with papermill (smoke preset, tiny data) and the book builds with -W."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from hipseg_lib.book import BookPlan, chapters, run_book
from hipseg_lib.locations import project_root

ROOT = Path(__file__).resolve().parents[1]


def test_every_notebook_is_a_chapter_of_the_toc_in_file_order():
    """chapters() follows _toc.yml; no notebook in book/ is left out of the built book, and the
    numbered file names run in the order the table of contents gives them."""
    names = [nb.name for nb in chapters(ROOT)]
    assert sorted(names) == sorted(p.name for p in (ROOT / "book").glob("*.ipynb"))
    assert names == sorted(names)


def test_committed_notebooks_are_clean_and_parametrised():
    for nb_path in chapters(ROOT):
        nb = nbformat.read(nb_path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{nb_path.name} has outputs"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, nb_path.name
        declared = pm.inspect_notebook(str(nb_path))
        assert "data_dir" in declared
        assert any("hide-input" in c.metadata.get("tags", []) for c in nb.cells)
        raw = json.loads(nb_path.read_text())
        assert all("id" in c for c in raw["cells"]), f"{nb_path.name}: a cell has no id (nbformat 4.5 needs one)"


def test_the_training_chapter_takes_the_settings_hipseg_train_has_flags_for():
    """The training chapter's parameters are settings of the run with the names hipseg train's flags
    have; papermill can set each."""
    from hipseg_lib.cli import TRAIN_FLAGS, build_parser

    declared = set(pm.inspect_notebook(str(ROOT / "book" / "04_training.ipynb")))
    run_options = {"preset", "data_dir", "model_dir", "device", "precision",
                   "check_results"}  # the last: the presets' Dice bar, on the validation patients
    assert run_options <= declared
    assert declared - run_options <= set(TRAIN_FLAGS), declared - run_options - set(TRAIN_FLAGS)
    flags = build_parser().parse_args(["train", "--epochs", "3", "--target-shape", "32x32x16", "--compile",
                                       "--precision", "fp32"])
    assert (flags.epochs, flags.target_shape, flags.compile, flags.precision) == (3, (32, 32, 16), True, "fp32")


@pytest.fixture(scope="module")
def built_book(tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    plan = BookPlan(preset="smoke", data_dir=str(tiny_synth), model_dir=str(out / "model"),
                    results_dir=str(out / "results"))
    html = run_book(plan, root=ROOT, build_dir=out / "_build", log=lambda s: None)
    return out, html


@pytest.mark.slow  # the book built with papermill
def test_book_executes_and_builds(built_book):
    out, html = built_book
    pages = sorted(p.name for p in (html / "book").glob("*.html"))
    assert pages == sorted([nb.stem + ".html" for nb in chapters(ROOT)] + ["index.html", "glossary.html",
                                                                           "references.html"])
    for page in pages:
        text = (html / "book" / page).read_text()
        if page not in ("index.html", "references.html", "glossary.html", "07_under_the_hood.html"):
            assert "data:image/png;base64" in text or "<img" in text, f"{page} has figures"
            assert "Traceback" not in text
    # The static slider is embedded (matplotlib jshtml), not an ipywidget needing a kernel.
    ch1 = (html / "book" / "01_data_exploration.html").read_text()
    assert "anim" in ch1 and "slider" in ch1.lower()
    assert "application/vnd.jupyter.widget-state+json" not in ch1
    assert (out / "model" / "new_model.pth").exists()
    metrics = json.loads((out / "results" / "test_metrics.json").read_text())
    assert metrics["cases"] and "hd95" in metrics["per_patient"]


@pytest.mark.slow  # the book built with papermill
def test_executed_notebooks_used_the_injected_parameters(built_book, tiny_synth):
    out, _ = built_book
    nb = nbformat.read(out / "_build" / "executed" / "book" / "04_training.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "preset = \"smoke\"" in injected[0].source
    assert str(tiny_synth) not in injected[0].source, "the machine's folders are left out once it ran"
    assert (out / "model" / "last.pth").exists()
    scored = json.loads((out / "results" / "test_metrics.json").read_text())["cases"]
    images = [p.name for p in (tiny_synth / "semantic_MRs_anon").iterdir()]
    assert scored and all(any(f"_{c['id']}_" in name for name in images) for c in scored), \
        "chapter 5 scored the data set it was given"


@pytest.mark.slow  # the book built with papermill
def test_code_and_text_output_fit_the_column(built_book):
    """The theme's content column holds about 80 characters: no code line and no printed line of an
    executed chapter is wider, so nothing scrolls sideways."""
    out, _ = built_book
    wide = []
    for nb_path in sorted((out / "_build" / "executed" / "book").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code" or "injected-parameters" in cell.metadata.get("tags", []):
                continue
            texts = [("code", cell.source)] + [("output", o.get("text", "")) for o in cell.outputs
                                               if o.get("output_type") == "stream"]
            texts += [("output", o.get("data", {}).get("text/plain", "")) for o in cell.outputs
                      if o.get("output_type") == "execute_result" and "text/html" not in o.get("data", {})]
            for kind, text in texts:
                wide += [f"{nb_path.stem} {kind}: {line}" for line in text.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide[:20])


@pytest.mark.slow  # the book built with papermill
def test_landing_page_shows_this_runs_result_and_references_resolve(built_book):
    out, html = built_book
    index = (html / "book" / "index.html").read_text()
    assert "landing.png" in index and (html / "_images" / "landing.png").exists()
    assert "mean Dice" in index and "mean HD95" in index and "smoke" in index
    assert (out / "results" / "landing.md").exists()
    refs = (html / "book" / "references.html").read_text()
    for name in ("Isensee", "Milletari", "Dowling", "nnU-Net"):
        assert name in refs, name
    ch3 = (html / "book" / "03_architecture.html").read_text()
    assert 'href="references.html#' in ch3, "citations link to the bibliography"


@pytest.mark.slow  # the book built with papermill
def test_no_code_block_scrolls_sideways_in_a_browser(built_book, chromium):
    """What a reader sees at 1280 px: every code block, printed output and table fits its column."""
    from playwright.sync_api import sync_playwright

    _, html = built_book
    overflowing = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for path in sorted((html / "book").glob("*.html")):
            page.goto(path.as_uri())
            n = page.evaluate("""() => [...document.querySelectorAll('div.highlight pre, div.output pre')]
                .filter(e => e.innerText.trim() && e.scrollWidth > e.clientWidth + 1).length""")
            n += page.evaluate("""() => [...document.querySelectorAll('table.hipseg-table')]
                .filter(t => t.scrollWidth > t.parentElement.clientWidth + 1).length""")
            if n:
                overflowing[path.name] = n
        browser.close()
    assert not overflowing, f"code blocks or tables wider than the column: {overflowing}"


@pytest.mark.slow  # the book built with papermill
def test_built_pages_work_with_the_network_off(built_book, chromium):
    """Every page opened with every request outside the build refused: none is attempted, the
    players' icons are drawn (the theme's own Font Awesome), chapter 4's formulas are typeset
    (MathJax shipped with the book) and chapter 5's 3D view turns."""
    from playwright.sync_api import sync_playwright

    _, html = built_book
    refused = []

    def offline(route):
        if route.request.url.startswith("file:"):
            return route.continue_()
        refused.append(route.request.url)
        return route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", offline)
        for path in sorted((html / "book").glob("*.html")):
            page.goto(path.as_uri())
            if path.name.startswith(("01_", "05_")):
                page.wait_for_selector(".anim-buttons svg", timeout=20_000)  # icons drawn
            if path.name.startswith("04_"):  # the loss's formulas, typeset by the MathJax the build ships
                page.wait_for_selector("mjx-container", timeout=20_000)
            if path.name.startswith("05_"):
                turntable = page.locator(".hipseg-turntable")
                turntable.scroll_into_view_if_needed()
                image = turntable.locator("img")
                first = image.get_attribute("src")
                turntable.locator('button[title="Next frame"]').click()
                page.wait_for_function("([el, s]) => el.src !== s", arg=[image.element_handle(), first])
                assert image.get_attribute("src").startswith("data:image/jpeg")
        browser.close()
    assert not refused, f"pages asked the network for: {sorted(set(refused))}"


@pytest.mark.slow  # the book built with papermill
def test_static_sliders_open_on_the_prostate(built_book):
    out, html = built_book
    for page in ("01_data_exploration.html", "05_evaluation.html"):
        text = (html / "book" / page).read_text()
        assert re.search(r"anim\w+\.set_frame\(\d+\);", text), page


@pytest.mark.slow  # chapter 4 run a second time with papermill
def test_chapter_4_run_twice_moves_the_earlier_run_to_previous(built_book, tiny_synth, tmp_path):
    out, _ = built_book
    model = out / "model"
    first = {n: (model / n).read_bytes() for n in ("new_model.pth", "last.pth")}
    assert not (model / "previous").exists()
    plan = BookPlan(preset="smoke", data_dir=str(tiny_synth), chapters=("04_training",),
                    model_dir=str(model), results_dir=str(tmp_path / "results"))
    run_book(plan, build=False, build_dir=tmp_path / "_build", root=ROOT, log=lambda s: None)
    archived = list((model / "previous").iterdir())
    assert len(archived) == 1, archived
    for name, data in first.items():
        assert (archived[0] / name).read_bytes() == data, f"{name} of the first run is kept as it was"
        assert (model / name).exists(), f"the second run wrote its own {name}"


@pytest.mark.slow  # the HTML built a second time
def test_launch_buttons_only_with_a_repository(built_book, tmp_path):
    """Built as the publishing workflow builds it (--repository URL): the repository, Binder and
    Colab links point at that repository's notebooks, and the .ipynb download is there. Built
    without one (the local book): none of those links."""
    from hipseg_lib.book import build_html, stage_sources

    out, local = built_book
    url = "https://github.com/someone/hipseg"
    stage = tmp_path / "executed"
    shutil.copytree(out / "_build" / "executed", stage)
    stage_sources(ROOT, stage, out / "results", repository=url)
    html = build_html(stage, tmp_path)
    page = (html / "book" / "01_data_exploration.html").read_text()
    assert "https://colab.research.google.com/github/someone/hipseg/blob/main/book/01_data_exploration.ipynb" \
        in page
    assert "https://mybinder.org/v2/gh/someone/hipseg/main?urlpath=lab/tree/book/01_data_exploration.ipynb" in page
    assert f'href="{url}"' in page, "the repository button"
    assert "_sources/book/01_data_exploration.ipynb" in page, "the .ipynb download"
    for name in ("01_data_exploration.html", "04_training.html", "index.html"):
        text = (local / "book" / name).read_text()
        assert "colab.research.google.com" not in text and "mybinder.org" not in text, name
        assert url not in text and "github.com/executablebooks/jupyter-book" not in text, name


def test_every_chapter_opens_with_the_same_hidden_setup():
    """The install cell (removed from the page), then the setup (folded), then the parameters
    (folded: a reader sees what they can change); the versions are printed once, in the appendix."""
    banners = []
    for nb in chapters(ROOT):
        cells = nbformat.read(nb, as_version=4).cells
        code = [c for c in cells if c.cell_type == "code"]
        assert code[0].id == "install" and "remove-cell" in code[0].metadata.tags, nb.name
        assert code[1].id == "setup" and "hide-input" in code[1].metadata.tags, nb.name
        assert "use_book_style()" in code[1].source, nb.name
        assert code[2].metadata.tags == ["parameters", "hide-input"], nb.name
        banners += [nb.name for c in code if "version_banner()" in c.source]
    assert len(banners) == 1, banners


def test_project_root_is_found():
    assert (project_root() / "_config.yml").exists()


def test_every_chapter_ends_with_exercises_whose_answers_the_build_computes():
    """d2l-style "Try it yourself": 2-4 numbered tasks, then one folded cell that computes and prints
    the answers (no answer is typed into the page, so none can contradict the code it asks for)."""
    for nb_path in chapters(ROOT):
        nb = nbformat.read(str(nb_path), as_version=4)
        if not re.match(r"# \d+\. ", nb.cells[0].source):  # the appendix has no exercises
            continue
        tasks, answers = nb.cells[-2], nb.cells[-1]
        assert tasks.cell_type == "markdown" and tasks.source.startswith("## Try it yourself"), nb_path.name
        numbered = [line for line in tasks.source.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
        assert 2 <= len(numbered) <= 4, (nb_path.name, numbered)
        assert answers.cell_type == "code" and answers.metadata.tags == ["hide-cell"], nb_path.name
        assert answers.metadata.mystnb["code_prompt_show"].startswith("Answers"), nb_path.name
        assert "display(Markdown(" in answers.source, nb_path.name
        typed = [c.id for c in nb.cells if c.cell_type == "markdown" and "Answers" in c.source]
        assert not typed, f"{nb_path.name}: answers typed into the page: {typed}"


def test_every_chapter_has_a_write_it_exercise_checked_against_the_library():
    """The reader writes a piece (a stub that raises NotImplementedError), a folded answer stands in
    for it in the build, and a check cell compares it with the library; a hidden assert keeps the
    build honest."""
    for nb_path in chapters(ROOT):
        nb = nbformat.read(str(nb_path), as_version=4)
        if not re.match(r"# \d+\. ", nb.cells[0].source):
            continue
        cells = {c.id: c for c in nb.cells}
        assert "raise NotImplementedError" in cells["write-it-yours"].source and \
            not cells["write-it-yours"].metadata.get("tags"), nb_path.name
        assert cells["write-it-answer"].metadata.tags == ["hide-input"], nb_path.name
        assert "check_answer(" in cells["write-it-check"].source, nb_path.name
        assert cells["write-it-passed"].metadata.tags == ["remove-cell"], nb_path.name


def test_no_gate_of_the_build_reads_the_test_patients():
    """The test patients are scored once and nothing checks their scores: no hidden assert of the
    evaluation chapter reads a test or cohort result."""
    nb = nbformat.read(ROOT / "book" / "05_evaluation.ipynb", as_version=4)
    gates = [c for c in nb.cells if c.cell_type == "code" and "assert" in c.source]
    assert gates, "the chapter checks its hand-written path and its exercise"
    for cell in gates:
        assert not re.search(r"\b(results|test|cohort|by_patient|dice|hd)\b", cell.source), cell.source


def _chapter_cell(notebook: str, cell_id: str) -> str:
    nb = nbformat.read(ROOT / "book" / notebook, as_version=4)
    return next(c.source for c in nb.cells if c.get("id") == cell_id)


@pytest.mark.slow  # the book built with papermill
def test_plumbing_and_build_paths_are_not_on_the_pages(built_book, tiny_synth):
    """Install, papermill's injected parameters, self-checks, the landing page's and the run
    folder's housekeeping run but are not on the pages; the setup and each chapter's own
    parameters (what a reader changes) are folded; no page, and no
    notebook a reader downloads, names a folder of the machine that built it."""
    out, html = built_book
    hidden = ["tools/repository.py --set URL", "# Parameters", "archive_previous_run(out)",
              "write_landing(", "the hand-written step is the library", "assert "]
    machine = [str(tiny_synth), str(out), str(ROOT), str(Path.home())]
    for path in sorted((html / "book").glob("*.html")):
        text = path.read_text()
        shown = [h for h in hidden if h in text]
        assert not shown, f"{path.name} shows {shown}"
        paths = [m for m in machine if m in text]
        assert not paths, f"{path.name} names {paths}"
        if path.stem[:2].isdigit():
            assert re.search(r'class="cell tag_hide-input[^"]*"', text), f"{path.name}: setup not folded"
            assert re.search(r'class="cell tag_parameters tag_hide-input[^"]*"', text), \
                f"{path.name}: its parameters are on the page, folded"
    for path in sorted(f for f in html.rglob("*") if f.is_file() and f.suffix in (".ipynb", ".md", ".js", ".txt")):
        text = path.read_text(errors="replace")  # the downloadable notebooks (_sources/) among them
        paths = [m for m in machine if m in text]
        assert not paths, f"{path.relative_to(html)} names {paths}"


@pytest.mark.slow  # the book built with papermill
def test_the_code_taught_is_on_the_page_and_the_terms_resolve(built_book):
    _, html = built_book
    page = {p.stem: p.read_text() for p in (html / "book").glob("*.html")}
    for stem, code in [("03_architecture", "return h + self.shortcut(x)"),
                       ("03_architecture", "for up, skip in zip(self.decoder, reversed(skips)):"),
                       ("04_training", "inter = (probs * onehot).sum(voxels)"),
                       ("04_training", "optimizer.zero_grad(set_to_none=True)"),
                       ("04_training", "def fit("),
                       ("01_data_exploration", "img = nib.load(path)"),
                       ("02_preprocessing", "def foreground_box("),
                       ("05_evaluation", "def window_starts("),
                       ("05_evaluation", "def dice_per_class(")]:
        text = re.sub(r"<[^>]+>", "", page[stem]).replace("&gt;", ">").replace("&lt;", "<")
        assert code in text, f"{stem} lacks {code!r}"
    glossary_ids = set(re.findall(r'id="(term-[^"]+)"', page["glossary"]))
    linked = {m for text in page.values() for m in re.findall(r'href="glossary\.html#(term-[^"]+)"', text)}
    assert len(linked) >= 15 and linked <= glossary_ids, sorted(linked - glossary_ids)
    # a fence the Markdown parser could not open (a backtick in a backtick fence's title) turns the
    # prose after it into one grey block: every block on the pages names its language
    for stem, text in page.items():
        assert 'class="highlight-default' not in text, f"{stem}: prose or code rendered as a bare block"


def _shown_library_code(root: Path) -> dict[str, list[str]]:
    """The lines of each ``literalinclude`` of ``hipseg_lib`` (``:pyobject:``) in the chapters."""
    import ast

    shown = {}
    for nb in chapters(root):
        for cell in nbformat.read(nb, as_version=4).cells:
            for path, name in re.findall(r"\{literalinclude\} \.\./(hipseg_lib/\w+\.py)\n:pyobject: ([\w.]+)",
                                         cell.source):
                source = (root / path).read_text()
                body, node = ast.parse(source).body, None
                for part in name.split("."):
                    node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                                and n.name == part)
                    body = node.body
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                shown[f"{nb.stem}: {path} {name}"] = source.splitlines()[start - 1:node.end_lineno]
    return shown


def test_the_library_code_shown_in_the_book_fits_its_column():
    """The functions the chapters print from hipseg_lib are written to 80 columns (the library's own
    limit is 120), so the code a reader studies never scrolls sideways."""
    shown = _shown_library_code(ROOT)
    assert len(shown) >= 15, sorted(shown)
    wide = [f"{where}: {line.strip()}" for where, lines in shown.items() for line in lines if len(line) > 80]
    assert not wide, "\n".join(wide)
