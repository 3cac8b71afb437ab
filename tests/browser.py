"""Open an HTML report in headless Chromium, offline, and say what went wrong: requests that would leave the
machine, console errors, uncaught script errors and images that did not decode. Debian's Chromium is driven
through Playwright (its own browser download is not needed)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome")
REQUIRE_ENV = "JAXTUNE_REQUIRE_BROWSER"
LOCAL_SCHEMES = ("file:", "data:")
# Waiting for images that are still loading after the load event (lazy ones are switched to eager first).
IMAGE_WAIT_MS = 5000
_IMAGES_JS = """async (waitMs) => {
  const imgs = Array.from(document.images);
  imgs.forEach((i) => { i.loading = "eager"; });
  const settled = (i) => i.complete ? null : new Promise((r) => {
    i.addEventListener("load", r, {once: true}); i.addEventListener("error", r, {once: true}); });
  await Promise.race([Promise.all(imgs.map(settled)), new Promise((r) => setTimeout(r, waitMs))]);
  return imgs.map((i) => ({src: i.currentSrc || i.getAttribute("src") || "", alt: i.alt,
                          ok: i.complete && i.naturalWidth > 0}));
}"""


@dataclass(frozen=True)
class PageCheck:
    title: str
    n_images: int
    blocked: tuple[str, ...]
    console_errors: tuple[str, ...]
    page_errors: tuple[str, ...]
    broken_images: tuple[str, ...]

    def problems(self) -> list[str]:
        """One line per failure; empty means the page rendered offline and clean."""
        return ([f"blocked network request: {u}" for u in self.blocked]
                + [f"console error: {m}" for m in self.console_errors]
                + [f"page error: {m}" for m in self.page_errors]
                + [f"broken image: {s}" for s in self.broken_images])


def find_chromium() -> str | None:
    """$JAXTUNE_CHROMIUM (a path or a name on PATH), else the first of NAMES on PATH."""
    chosen = os.environ.get("JAXTUNE_CHROMIUM")
    if chosen:
        return shutil.which(chosen)
    return next((path for path in map(shutil.which, NAMES) if path), None)


def unavailable() -> str | None:
    """Why no page can be checked here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed: pip install -e '.[dev]'"
    if find_chromium() is None:
        if os.environ.get("JAXTUNE_CHROMIUM"):
            return f"JAXTUNE_CHROMIUM={os.environ['JAXTUNE_CHROMIUM']} is not an executable"
        return "no Chromium found: apt-get install chromium"
    return None


@contextlib.contextmanager
def launch(executable: str | None = None) -> Iterator[object]:
    """One headless Chromium (a Playwright Browser) for many check_page calls."""
    from playwright.sync_api import sync_playwright

    executable = executable or find_chromium()
    if executable is None:
        raise RuntimeError("no Chromium found: apt-get install chromium")
    # Chromium's sandbox refuses to start as root (containers, CI).
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


def _short(url: str, n: int = 80) -> str:
    return url if len(url) <= n else url[:n] + "…"


def check_page(path: str | Path, browser=None) -> PageCheck:
    """Load `path` as file://, let only file: and data: requests through, and report what went wrong.
    Without `browser` one is launched for this page alone."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if browser is None:
        with launch() as own:
            return check_page(path, own)
    blocked, console_errors, page_errors = [], [], []

    def route(r):
        if r.request.url.startswith(LOCAL_SCHEMES):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort("blockedbyclient")

    def console(m):
        # Each aborted request also logs "Failed to load resource": it is already in `blocked`.
        if m.type == "error" and not (m.location.get("url") in blocked and "ERR_BLOCKED_BY_CLIENT" in m.text):
            console_errors.append(m.text)

    context = browser.new_context(service_workers="block")
    try:
        page = context.new_page()
        page.route("**/*", route)
        page.route_web_socket("**", lambda ws: (blocked.append(ws.url), ws.close()))
        page.on("console", console)
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        page.goto(path.as_uri(), wait_until="load")
        images = page.evaluate(_IMAGES_JS, IMAGE_WAIT_MS)
        title = page.title()
    finally:
        context.close()
    broken = tuple(f"{i['alt'] or '(no alt)'} {_short(i['src'])}" for i in images if not i["ok"])
    return PageCheck(title=title, n_images=len(images), blocked=tuple(blocked),
                     console_errors=tuple(console_errors), page_errors=tuple(page_errors), broken_images=broken)


def checker_session() -> Iterator[Callable[..., PageCheck]]:
    """The html_checker fixture: one browser for every page; without one, skip, or fail where REQUIRE_ENV=1."""
    import pytest

    reason = unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires the browser tests)", pytrace=False)
        pytest.skip(reason)
    with launch() as chromium:
        yield functools.partial(check_page, browser=chromium)
