"""Reports rendered in a real headless Chromium (Debian's `chromium` package, driven by the
Python `playwright` package with `executable_path`; no browser download): no console errors,
no request outside the file itself, every image decoded, the key tables shown, and completions
shown as text. Full-page screenshots go to `test-artifacts/` (git-ignored).

`make test` installs Chromium when missing (`make chromium`); where it cannot be installed
this test skips and says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from report_runs import XSS, write_run

from mechrl.runs.report import build_report

CHROMIUM = Path("/usr/bin/chromium")
# the flags Debian's Chromium needs to run headless as root in a container (see STACK.md)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM}: "
                                "`make chromium` installs it with apt-get (needs root or sudo)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, path: Path, screenshot: str):
    """Load the report; return the page and the problems seen (console errors, page errors,
    failed or non-local requests). Saves a full-page screenshot."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: None if r.url.startswith(("file://", "data:")) else problems.append(f"network: {r.url}"))
    page.goto(path.as_uri(), wait_until="load")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / screenshot
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    return page, problems, shot


def _images(page) -> list[tuple[bool, int, int]]:
    # (complete, naturalWidth, naturalHeight) of every <img>
    return [tuple(x) for x in page.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")]


def _rows(page, kind: str) -> list[list[str]]:
    return page.evaluate("""kind => Array.from(document.querySelectorAll(`table[data-kind="${kind}"] tr`))
                                  .map(tr => Array.from(tr.cells).map(c => c.innerText))""", kind)


def test_single_run_report_in_chromium(browser, tmp_path):
    run = write_run(tmp_path, seed=1)
    page, problems, shot = _open(browser, build_report([run], tmp_path / "report.html"), "report-single.png")
    assert problems == []
    assert shot.stat().st_size > 100_000, f"{shot}: too small for a page of six figures"
    imgs = _images(page)
    assert len(imgs) == 6 and all(ok and w > 100 and h > 100 for ok, w, h in imgs), imgs
    assert page.evaluate("document.scripts.length") == 0
    config = dict((r[0], r[1]) for r in _rows(page, "config")[1:])
    assert config["seed"] == "1" and config["kind"] == "sft"
    ev = _rows(page, "eval")
    assert ev[0][:4] == ["split", "rule family", "n @10", "accuracy @10"] and ev[1][:4] == ["test", "all", "16", "0.260"]
    samples = _rows(page, "samples")
    assert len(samples) == 3 and XSS in samples[1][3]  # the tag is shown as text, never run
    assert page.locator("h1").inner_text().startswith("Run report: ")
    page.close()


def test_multi_run_report_in_chromium(browser, tmp_path):
    runs = [write_run(tmp_path, seed=1, lr=2e-3), write_run(tmp_path, seed=2, lr=1e-3)]
    page, problems, shot = _open(browser, build_report(runs, tmp_path / "compare.html"), "report-compare.png")
    assert problems == []
    assert shot.stat().st_size > 200_000, f"{shot}: too small for a page of eighteen figures"
    imgs = _images(page)
    assert len(imgs) == 6 + 2 * 6 and all(ok and w > 100 for ok, w, _ in imgs), imgs
    diff = _rows(page, "config-diff")
    assert diff == [["key", runs[0].name, runs[1].name], ["seed", "1", "2"], ["train.lr", "0.002", "0.001"]]
    assert len(_rows(page, "config")) > 20 * 2 and len(_rows(page, "eval")) == 2 * 5
    assert _rows(page, "final-eval")[1][:2] == ["test", "0.510"]
    page.close()


def test_the_checks_catch_a_broken_page(browser, tmp_path):
    """The same checks on a page with a broken image and a request off the machine do fail."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                   '<img src="http://127.0.0.1:9/x.png"></body></html>')
    page, problems, _ = _open(browser, bad, "broken-page.png")
    assert [w for _, w, _ in _images(page)] == [0, 0]
    assert any(p.startswith("network: http://127.0.0.1:9/x.png") for p in problems), problems
    page.close()
