"""The page in a real browser: headless Chromium (Debian's, driven by Playwright) uploads an image,
presses Caption / Answer / Rank and reads what the page shows, which must be what the library gives
for the same image; a bad upload shows its one-line message. A screenshot of each tab is saved to
the test's tmp dir and to test-artifacts/ui/.

Playwright's own browser download is not used (not reachable here): the test drives
/usr/bin/chromium, which `.ci/run` installs when it is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):  # .ci/run installs chromium: CI always runs this test
        raise RuntimeError(f"CI=true but no chromium at {CHROMIUM}; .ci/run should have installed it")
    pytest.skip(
        "browser test skipped: no chromium; install it (apt-get install -y chromium) to run it",
        allow_module_level=True,
    )
playwright = pytest.importorskip("playwright.sync_api", reason="browser test skipped: pip install playwright")


@pytest.fixture(scope="module")
def page(ui_server, tmp_path_factory):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        page.outside_requests = []  # anything the page asks for that is not this server
        page.on(
            "request",
            lambda r: (
                None
                if r.url.startswith((ui_server.url, "data:", "blob:"))
                else page.outside_requests.append(r.url)
            ),
        )
        page.goto(ui_server.url)
        page.wait_for_selector("#caption-button")
        yield page
        browser.close()


def screenshot(page, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    assert path.stat().st_size > 10_000


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def upload(page, tab: str, path) -> None:
    page.locator(f"#{tab}-image input[type=file]").set_input_files(str(path))
    page.locator(f"#{tab}-image img").first.wait_for()  # the preview: the upload has finished


def output_text(page, element_id: str) -> str:
    box = page.locator(f"#{element_id} textarea")
    playwright.expect(box).not_to_have_value("")
    return box.input_value()


def test_caption_tab(page, ui_server, sample_images, tmp_path):
    image = sample_images[2]
    open_tab(page, "Caption")
    upload(page, "caption", image)
    page.locator("#caption-button").click()
    shown = output_text(page, "caption-output")
    assert shown == ui_server.service.caption(str(image))
    screenshot(page, tmp_path, "caption-tab")


def test_vqa_tab(page, ui_server, sample_images, tmp_path):
    image = sample_images[3]
    open_tab(page, "VQA")
    upload(page, "vqa", image)
    page.locator("#vqa-question textarea").fill("what is on the table?")
    page.locator("#vqa-button").click()
    shown = output_text(page, "vqa-output")
    assert shown == ui_server.service.answer(str(image), "what is on the table?")
    screenshot(page, tmp_path, "vqa-tab")


def test_retrieval_tab(page, ui_server, sample_images, tmp_path):
    image = sample_images[0]
    texts = ["an astronaut", "a brick wall", "a cup of coffee"]
    open_tab(page, "Retrieval")
    upload(page, "retrieval", image)
    page.locator("#retrieval-texts textarea").fill("\n".join(texts))
    page.locator("#retrieval-button").click()
    expected = [r["text"] for r in ui_server.service.rank(str(image), texts)]
    table = page.locator("#retrieval-output")
    playwright.expect(table).to_contain_text(expected[0])
    # The table shows the texts best first, as the library ranks them.
    shown = table.inner_text()
    assert sorted(expected, key=shown.index) == expected
    screenshot(page, tmp_path, "retrieval-tab")


def test_bad_input_shows_a_readable_message(page, bad_files, sample_images, tmp_path):
    open_tab(page, "Caption")
    page.locator("#caption-image input[type=file]").set_input_files(str(bad_files["text"]))
    page.locator("#caption-button").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="notes.jpg")
    playwright.expect(toast).to_contain_text("notes.jpg: not an image (unrecognised format)")
    assert "Traceback" not in toast.inner_text()
    page.wait_for_timeout(600)  # the toast fades in
    screenshot(page, tmp_path, "caption-tab-error")

    open_tab(page, "VQA")
    upload(page, "vqa", sample_images[0])
    page.locator("#vqa-question textarea").fill("is there an <image> here?")
    page.locator("#vqa-button").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="reserves")
    playwright.expect(toast).to_contain_text("the question contains '<image>', which this model reserves")


def test_the_page_loads_nothing_from_outside(page):
    """No fonts, scripts or telemetry from the internet: everything comes from the local server."""
    assert page.outside_requests == []
