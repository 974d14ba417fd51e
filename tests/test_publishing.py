"""Publishing: the GitHub workflows (linted by actionlint), the repository URL kept in one place,
the chapters' install cell (a no-op where hipseg is installed), the book's launch buttons."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hipseg_lib.book import publishing_config

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
sys.path.insert(0, str(ROOT / "tools"))

import repository as R  # noqa: E402


def _lint(actionlint, *files):
    return subprocess.run([*actionlint, *map(str, files)], capture_output=True, text=True, timeout=120)


def test_the_workflows_pass_actionlint(actionlint):
    assert [w.name for w in WORKFLOWS] == ["book.yml", "tests.yml"]
    r = _lint(actionlint, *WORKFLOWS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 file(s), 0 problem(s)" in r.stdout


def test_a_broken_workflow_fails_actionlint(actionlint, tmp_path):
    text = (ROOT / ".github" / "workflows" / "book.yml").read_text()
    broken = tmp_path / "broken.yml"
    broken.write_text(text.replace("steps.deployment.outputs.page_url", "steps.deploymnt.outputs.page_url")
                      .replace("    timeout-minutes: 90", "    timeout-minutes: 90\n    retries: 2"))
    r = _lint(actionlint, broken)
    assert r.returncode == 1
    assert 'unexpected key "retries"' in r.stdout and 'property "deploymnt" is not defined' in r.stdout


def _steps(job: dict) -> list[str]:
    return [s.get("uses", "").split("@")[0] or s.get("run", "") for s in job["steps"]]


def test_the_pages_workflow_is_the_guides_with_this_projects_commands():
    book = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    on = book[True]  # YAML 1.1 reads the key `on` as true
    assert on["push"]["branches"] == ["main"] and "workflow_dispatch" in on
    assert book["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    build = book["jobs"]["build"]
    steps = _steps(build)
    test, make_book = steps.index(".ci/run"), next(i for i, s in enumerate(steps) if s.startswith("make book"))
    assert test < make_book < steps.index("actions/upload-pages-artifact"), "tests, then the book, then upload"
    assert 'REPOSITORY="${{ github.server_url }}/${{ github.repository }}"' in steps[make_book]
    assert any("tools/repository.py --check" in s for s in steps[:test]), "the install URL is checked first"
    upload = build["steps"][steps.index("actions/upload-pages-artifact")]
    assert upload["with"]["path"] == "_build/html"
    assert _steps(book["jobs"]["deploy"]) == ["actions/deploy-pages"] and book["jobs"]["deploy"]["needs"] == "build"
    tests = yaml.safe_load((ROOT / ".github" / "workflows" / "tests.yml").read_text())
    assert "pull_request" in tests[True] and ".ci/run" in _steps(tests["jobs"]["test"])


def test_the_workflows_run_the_tests_as_ci_does():
    """The Slurm tests run their daemons as root and .ci/run installs what they need with apt, so
    GitHub runs .ci/run as root in the Debian 12, Python 3.11 container (a runner's own user would
    fail them)."""
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    for name, job in (("book.yml", "build"), ("tests.yml", "test")):
        spec = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())["jobs"][job]
        assert spec["container"]["image"] == "python:3.11-bookworm", name
        assert ".ci/run" in _steps(spec) and "make test" not in _steps(spec), name


def _install_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code[0]["id"] == "install", f"{notebook.name}: the install cell comes first"
    return "".join(code[0]["source"])


@pytest.mark.parametrize("notebook", sorted((ROOT / "book").glob("*.ipynb")), ids=lambda p: p.stem)
def test_the_install_cell_does_nothing_where_hipseg_is_installed(notebook, monkeypatch):
    source = _install_cell(notebook)
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: calls.append(a))
    exec(compile(source, notebook.name, "exec"), {})
    assert calls == [], "hipseg_lib is importable here: nothing is installed"


def test_the_install_cell_says_what_to_do_or_clones_and_installs(monkeypatch, tmp_path):
    source = _install_cell(ROOT / "book" / "01_data_exploration.ipynb")
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setitem(sys.modules, "hipseg_lib", None)  # as on Colab: not importable
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HIPSEG_ROOT", raising=False)
    if R.pyproject_url() == "":  # no repository known: one line saying what to do, no traceback
        with pytest.raises(SystemExit, match="clone the project this book comes from and run `make lab`"):
            exec(compile(source, "install", "exec"), {})
    url = "https://github.com/someone/hipseg"
    exec(compile(source.replace('REPOSITORY = ""', f'REPOSITORY = "{url}"')
                 .replace(f'REPOSITORY = "{R.pyproject_url()}"', f'REPOSITORY = "{url}"'), "install", "exec"), {})
    root = str(tmp_path / "hipseg")
    assert calls == [["git", "clone", "--depth", "1", url, root],
                     [sys.executable, "-m", "pip", "install", "-q", "-e", root + "[book]"],
                     [sys.executable, "-m", "hipseg_lib", "synth", "--out",
                      str(tmp_path / "hipseg" / "data" / "synthetic")]]
    import os

    assert os.environ["HIPSEG_ROOT"] == root
    monkeypatch.delenv("HIPSEG_ROOT")


def test_the_chapters_and_pyproject_name_the_same_repository():
    urls = R.chapter_urls()
    assert sorted(urls) == sorted(p.name for p in (ROOT / "book").glob("*.ipynb"))
    assert set(urls.values()) == {R.pyproject_url()}


def test_the_repository_tool_sets_one_place_and_copies_it(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # (an interrupted kernel can leave its IPC sockets in book/: not files, not copied)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("kernel-ipc-*"))
    url = "https://github.com/someone/hipseg"
    R.set_url(url, tmp_path)
    assert R.pyproject_url(tmp_path) == url
    assert set(R.chapter_urls(tmp_path).values()) == {url}
    import tomllib

    assert tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["name"] == "hipseg"
    R.set_url(url + "2", tmp_path)
    assert R.pyproject_url(tmp_path) == url + "2" and set(R.chapter_urls(tmp_path).values()) == {url + "2"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "repository.py"), "--check", url],
                       capture_output=True, text=True, cwd=ROOT)
    if R.pyproject_url() != url:
        assert r.returncode == 1 and "tools/repository.py --set" in r.stderr


def test_the_publishing_config_turns_on_the_buttons_for_that_repository():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "repository" not in config and "launch_buttons" not in config, "a local build links nowhere"
    out = publishing_config(config, "https://github.com/someone/hipseg/")
    assert out["repository"] == {"url": "https://github.com/someone/hipseg", "path_to_book": "", "branch": "main"}
    assert out["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert out["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    assert out["html"]["use_repository_button"] and out["html"]["use_download_button"]
    assert out["title"] == config["title"], "the rest of the config is kept"
    other = publishing_config(config, "https://gitlab.com/someone/hipseg")
    assert "colab_url" not in other["launch_buttons"], "Colab opens GitHub notebooks only"
