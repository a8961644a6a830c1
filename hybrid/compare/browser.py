"""Headless Chromium: a full-page PNG of the dashboard and its rendered DOM (for the self-check).

Plotly's own PNG export needs Kaleido plus a browser anyway, so we drive the browser directly. Found as
``$CHROMIUM`` or ``chromium`` / ``chromium-browser`` / ``google-chrome`` on ``PATH``; without one, the
caller gets ``None`` and skips PNGs (the HTML needs no browser to build).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    return next((p for p in map(shutil.which, NAMES) if p), None)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (install Debian's `chromium`, or set CHROMIUM=/path/to/chrome)")
    with tempfile.TemporaryDirectory(prefix="hybrid-chromium-") as profile:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--mute-audio", f"--user-data-dir={profile}", "--run-all-compositor-stages-before-draw",
               "--virtual-time-budget=15000", "--enable-logging=stderr", "--v=0", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, png: Path, width: int = 1400, height: int | None = None, timeout: float = 120) -> Path:
    """Full-page PNG; ``height`` defaults to an estimate from the number of sections on the page."""
    if height is None:
        text = Path(page).read_text()
        height = 250 + 500 * text.count("class='chart'") + 110 * text.count("class='note'") + 24 * text.count("<tr")
    png = Path(png).resolve()
    proc = _run([f"--screenshot={png}", f"--window-size={width},{min(height, 16000)}", Path(page).resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def dump_dom(page: Path, timeout: float = 120) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the console errors Chromium logged."""
    proc = _run(["--dump-dom", Path(page).resolve().as_uri()], timeout)
    errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and re.search(r"error|uncaught", line, re.I)]
    return proc.stdout, errors
