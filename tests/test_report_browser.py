"""report.html in a real browser: headless Chromium renders it, with no console errors.

    .venv/bin/python -m pytest -q tests/test_report_browser.py     # needs `chromium` on PATH (.ci/run installs it)
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import make_real_output, outputs

from fine_tuning_llms import report

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")]

# No network, no first-run work, no sync: the page is a local file and must render on its own.
QUIET_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--enable-logging=stderr", "--v=0"]
HEADINGS = ("개요 / Overview", "모델 비교 / Model comparison", "특수 토큰 / Special tokens", "전처리 / Preprocessing",
            "학습 / Training", "Trainer vs 수동 루프 / Trainer vs manual loop", "실행되지 않은 작업 / Tasks not run")


def chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(["chromium", *QUIET_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=60)


def console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message (console.error and uncaught exceptions included) as
    # "...:CONSOLE..."; the report has no scripts, so any such line is a fault.
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def screenshot(page: Path, tmp: Path) -> tuple[Path, subprocess.CompletedProcess]:
    png = tmp / f"{page.stem}.png"
    done = chromium(page, tmp, f"--screenshot={png}", "--window-size=1200,2000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.is_file(), done.stderr[-2000:]
    return png, done


def test_console_check_catches_a_script_error(tmp_path):
    # The detector must be able to fail: a page that throws has to show up in the log.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><h1>x</h1><script>throw new Error("kaboom")</script></body></html>')
    done = chromium(bad, tmp_path, "--dump-dom")
    assert any("kaboom" in line for line in console_lines(done.stderr)), done.stderr[-2000:]


def test_report_renders_in_chromium(tmp_path, tiny_model_dir):
    from PIL import Image

    page = report.build_report(make_real_output(tmp_path / "out", tiny_model_dir), outputs())
    png, shot = screenshot(page, tmp_path)
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) one colour: nothing rendered"
    white = sum(count for count, rgb in colours if min(rgb) >= 250)
    assert white < 0.9 * image.size[0] * image.size[1], "screenshot is almost all white"
    header = image.crop((0, 0, 1200, 60)).convert("RGB").getpixel((600, 5))
    assert header[2] > header[0] + 20, f"header band not dark blue: {header}"  # the CSS was applied

    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in dom.stdout
    assert "<script" not in dom.stdout
    assert console_lines(shot.stderr + dom.stderr) == []


def test_empty_report_renders_with_every_task_not_run(tmp_path):
    (tmp_path / "empty").mkdir()
    page = report.build_report(tmp_path / "empty", outputs())
    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("아직 실행되지 않음 / Not run yet") == len([o for o in outputs() if not o.optional])
    assert console_lines(dom.stderr) == []
