"""A headless Chromium on the viewer's page (playwright driving the system's chromium): for `make demo`'s
screenshots, the viewer's test and its benchmark. Optional: playwright is a test extra, the browser a system
package (Debian's `chromium`, which `make test` and `make demo` install with apt when run as root)."""
from __future__ import annotations

import shutil
from contextlib import contextmanager

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing() -> str | None:
    """Why no browser can be driven here (None: one can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; it is in the test extras)"
    if find_chromium() is None:
        return "no chromium on PATH (apt-get install chromium; make test and make demo do it as root)"
    return None


@contextmanager
def open_page(url: str, width: int = 1024, height: int = 768, settle_s: float = 120.0):
    """A page at `url` in a headless Chromium, once the viewer's first tiles are in (window.viewer.settled())."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            wait_settled(page, settle_s)
            yield page
        finally:
            browser.close()


def wait_settled(page, timeout_s: float = 120.0) -> None:
    """Until the view has been still and every requested tile has arrived."""
    page.wait_for_timeout(50)
    page.wait_for_function("window.viewer && window.viewer.settled()", timeout=timeout_s * 1000)


def zoom(page, x: float, y: float, factor: float, timeout_s: float = 120.0) -> dict:
    """Zoom by `factor` about screen point (x, y) with the mouse wheel; the viewport once tiles are in."""
    import math

    page.mouse.move(x, y)
    clicks = max(1, round(abs(math.log(factor)) / 0.6))
    for _ in range(clicks):  # the page zooms by exp(-deltaY * 0.002) per wheel event
        page.mouse.wheel(0, -math.log(factor) / clicks / 0.002)
    wait_settled(page, timeout_s)
    return page.evaluate("window.viewer.viewport()")
