"""HTML reports in a real headless Chromium, offline: every figure decodes, nothing is fetched, no script or
console errors; and the checker itself fails on each kind of broken page."""

from __future__ import annotations

import browser
import pytest
from test_eval_report import _doc, scored  # noqa: F401  (scored is the shared report fixture)

from jaxtune.eval import report as rp


def test_eval_report_renders_offline_with_every_figure(scored, html_checker, tmp_path):  # noqa: F811
    doc = _doc(scored, n_samples=3)
    _, html_path = rp.write_report(doc, tmp_path)
    page = html_checker(html_path)
    assert page.problems() == []
    assert page.title == "jaxtune report"
    assert page.n_images == len(rp.figures(doc)) == 5


BROKEN_PAGES = {
    "remote image": ('<img alt="x" src="https://example.com/x.png">', "blocked", "https://example.com/x.png"),
    "remote stylesheet": ('<link rel="stylesheet" href="http://example.com/style.css">', "blocked",
                          "http://example.com/style.css"),
    "script fetch": ('<script>fetch("http://example.com/data.json").catch(() => {})</script>', "blocked",
                     "http://example.com/data.json"),
    "console.error": ('<script>console.error("report broke")</script>', "console_errors", "report broke"),
    "uncaught error": ('<script>throw new Error("no such figure")</script>', "page_errors", "no such figure"),
    "undecodable data image": ('<img alt="x" src="data:image/png;base64,AAAA">', "broken_images",
                               "x data:image/png;base64,AAAA"),
    "missing local image": ('<img alt="x" src="missing.png">', "broken_images", "x file://"),
}


@pytest.mark.parametrize("name", list(BROKEN_PAGES))
def test_checker_fails_a_broken_page(name, html_checker, tmp_path):
    body, field, expected = BROKEN_PAGES[name]
    path = tmp_path / "report.html"
    path.write_text(f"<!doctype html><html><head><title>t</title></head><body><p>hi</p>{body}</body></html>")
    page = html_checker(path)
    found = getattr(page, field)
    assert len(found) == 1 and found[0].startswith(expected), page
    assert any(expected in line for line in page.problems())
    if field == "blocked":  # an aborted request is reported once, not again as its console error
        assert page.console_errors == ()


def test_without_chromium_the_fixture_skips_or_under_ci_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXTUNE_CHROMIUM", raising=False)
    monkeypatch.delenv(browser.REQUIRE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert browser.find_chromium() is None
    with pytest.raises(pytest.skip.Exception, match=r"^no Chromium found: apt-get install chromium$"):
        next(browser.checker_session())
    monkeypatch.setenv(browser.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no Chromium found.*JAXTUNE_REQUIRE_BROWSER=1"):
        next(browser.checker_session())

    fake = tmp_path / "chromium-browser"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert browser.find_chromium() == str(fake)
    monkeypatch.setenv("JAXTUNE_CHROMIUM", str(tmp_path / "nope"))
    assert browser.find_chromium() is None
    assert browser.unavailable() == f"JAXTUNE_CHROMIUM={tmp_path / 'nope'} is not an executable"
