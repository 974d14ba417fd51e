"""Screenshot a built chapter's static slider at two slices with headless Chromium.

Checks that the JavaScript slider works in the static HTML with no kernel and no network:
a copy of the page gets a script that moves the first slider to a given frame, and Chromium
renders it. Compare the two PNGs (they must differ where the slice changes).

    python tools/slider_screenshots.py _build/html/book/01_data_exploration.html --frames 3 18

Needs Debian's chromium (`apt-get install chromium`); not part of `make test`.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
<script>
window.addEventListener('load', function () {
  var s = document.querySelectorAll('input[type=range]')[%(index)d];
  s.value = %(frame)d;
  s.dispatchEvent(new Event('input'));
  // Headless screenshots capture the top of the page: bring the slider's output there.
  var box = s.closest('.animation');
  var holder = document.createElement('div');
  holder.style.cssText = 'background:white;padding:12px;position:absolute;top:0;left:0;z-index:9999;width:100%%';
  holder.appendChild(box);
  document.body.appendChild(holder);
});
</script>
"""


def shoot(page: Path, frame: int, index: int, out: Path, chromium: str) -> Path:
    html = page.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        copy = page.parent / f".slider-{frame}.html"
        head, sep, tail = html.rpartition("</body>")
        copy.write_text(head + SCRIPT % {"index": index, "frame": frame} + sep + tail)
        try:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--disable-quic", f"--user-data-dir={tmp}", "--window-size=1100,1300",
                            f"--screenshot={out}", copy.as_uri()],
                           check=True, capture_output=True, timeout=120)
        finally:
            copy.unlink()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page", type=Path)
    p.add_argument("--frames", type=int, nargs=2, default=[2, 16])
    p.add_argument("--slider", type=int, default=0, help="which slider on the page (0 = first)")
    p.add_argument("--out", type=Path, default=Path("_build/screenshots"))
    a = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("slider_screenshots: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    digests = []
    for f in a.frames:
        png = shoot(a.page.resolve(), f, a.slider, (a.out / f"{a.page.stem}_frame{f}.png").resolve(), chromium)
        digests.append(hashlib.sha256(png.read_bytes()).hexdigest())
        print(png)
    if digests[0] == digests[1]:
        print("the two screenshots are identical: the slider did not move", file=sys.stderr)
        return 1
    print("the screenshots differ: the static slider moved between frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
