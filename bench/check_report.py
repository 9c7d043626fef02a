"""Look at a report as a person does: render its index.html in headless Chromium, take a screenshot,
and fail if a figure did not load or the page logged an error.

    python bench/check_report.py REPORT_DIR [--screenshot shot.png] [--browser chromium]

The page checks itself on load (every image decoded, no script error) and writes the verdict
into `<body data-check>`; this script reads it from the DOM Chromium dumps after loading the page
from disk (no network: the page needs none). Needs Debian's `chromium` package (or
--browser PATH). Exit 0: the page is whole; 1: it is not; 2: no browser or no page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--allow-file-access-from-files", "--disable-background-networking",
         "--virtual-time-budget=5000"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="the report's directory (moeplan report --out)")
    ap.add_argument("--screenshot", default=None, help="[default: REPORT/screenshot.png]")
    ap.add_argument("--browser", default=None, help="[default: chromium on PATH]")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=4000)
    a = ap.parse_args(argv)
    page = Path(a.report) / "index.html"
    browser = a.browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if not page.is_file():
        print(f"check_report: {page} does not exist", file=sys.stderr)
        return 2
    if not browser:
        print("check_report: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    url = page.resolve().as_uri()
    dom = subprocess.run([browser, *FLAGS, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1))) if body else {}
    verdict, figures = attrs.get("data-check", "no verdict"), attrs.get("data-figures", "?")
    shot = Path(a.screenshot or Path(a.report) / "screenshot.png")
    subprocess.run([browser, *FLAGS, f"--window-size={a.width},{a.height}",
                    f"--screenshot={shot.resolve()}", url], capture_output=True, timeout=120)
    images = len(re.findall(r"<img ", page.read_text()))
    ok = verdict == "ok" and figures == str(images) and shot.is_file()
    print(f"{page}: {verdict}; {figures} of {images} figures decoded; screenshot "
          f"{shot if shot.is_file() else 'missing'} ({a.width}x{a.height})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
