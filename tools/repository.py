"""The repository URL the project keeps in one place: ``[project.urls] Repository`` in pyproject.toml.

The chapters' first code cell installs hipseg from it when ``hipseg_lib`` is not importable (a
copy of the notebook opened on Colab or Binder); each chapter holds a copy of the URL, since
Colab opens the notebook alone. This tool sets the one place and copies it into the chapters,
and checks them:

    python3 tools/repository.py                 # print the URL (empty: not set yet)
    python3 tools/repository.py --set URL       # write it into pyproject.toml and every chapter
    python3 tools/repository.py --check URL     # exit 1 unless pyproject.toml and the chapters say URL
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL_LINE = re.compile(r'^REPOSITORY = "(?P<url>[^"]*)"')


def pyproject_url(root: Path = ROOT) -> str:
    doc = tomllib.loads((root / "pyproject.toml").read_text())
    return doc.get("project", {}).get("urls", {}).get("Repository", "")


def chapter_urls(root: Path = ROOT) -> dict[str, str]:
    """Each chapter's copy of the URL, from its install cell."""
    found = {}
    for nb in sorted((root / "book").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            for line in "".join(cell["source"]).splitlines():
                m = CELL_LINE.match(line)
                if cell["cell_type"] == "code" and m:
                    found[nb.name] = m["url"]
    return found


def set_url(url: str, root: Path = ROOT) -> None:
    text = (root / "pyproject.toml").read_text()
    line = f'Repository = "{url}"'
    if "[project.urls]" in text:
        text = re.sub(r'(?m)^Repository = ".*"$', line, text) if "Repository = " in text else \
            text.replace("[project.urls]", f"[project.urls]\n{line}")
    else:
        text = text.replace("[project.optional-dependencies]", f"[project.urls]\n{line}\n\n"
                            "[project.optional-dependencies]")
    (root / "pyproject.toml").write_text(text)
    for nb in sorted((root / "book").glob("*.ipynb")):
        doc = json.loads(nb.read_text())
        for cell in doc["cells"]:
            cell["source"] = [f'REPOSITORY = "{url}"' + s[len(CELL_LINE.match(s)[0]):]
                              if cell["cell_type"] == "code" and CELL_LINE.match(s) else s
                              for s in cell["source"]]
        nb.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", metavar="URL")
    p.add_argument("--check", metavar="URL")
    a = p.parse_args()
    if a.set:
        set_url(a.set.rstrip("/"))
    url = pyproject_url()
    if a.check:
        want = a.check.rstrip("/")
        wrong = {n: u for n, u in chapter_urls().items() if u != want}
        if url != want or wrong:
            print(f"repository: pyproject.toml says {url or '(nothing)'!r}, this repository is {want!r}"
                  + (f"; chapters that differ: {', '.join(sorted(wrong))}" if wrong else "")
                  + f"; run: python3 tools/repository.py --set {want} (and commit)", file=sys.stderr)
            return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
