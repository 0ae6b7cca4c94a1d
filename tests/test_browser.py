"""The demo in a real browser: ``vlm-accel demo`` on a free localhost port, driven by headless Chromium (Debian's
``chromium`` + ``chromium-driver`` through Selenium; nothing is downloaded at run time).

Image tab: upload a bundled sample, ask, see both answers, the token counts, the timing table and the overlay; change
the budget and the method and ask again (applied without a restart). Video tab: the bundled clip, the answer and a
gallery with frames reused from the frame cache marked. A bad file shows a message, never a traceback. Screenshots
go to ``$VLM_ACCEL_ARTIFACTS`` (default ``build/test-artifacts/browser``).

Needs: ``apt-get install chromium chromium-driver`` and ``pip install selenium`` (``.ci/run`` installs them). Skipped,
with the reason, only where they are not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_zoo import image_views, kept_tokens

from vlm_accel import zoo
from vlm_accel.demo import SAMPLE_VIDEO

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
]


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if CHROMIUM is None or DRIVER is None:
        return "no Chromium / chromedriver on PATH (apt-get install chromium chromium-driver)"
    pytest.importorskip("gradio")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"no browser: {_missing()}")
ARTIFACTS = Path(os.environ.get("VLM_ACCEL_ARTIFACTS") or ROOT / "build" / "test-artifacts" / "browser")
TIMEOUT = float(os.environ.get("VLM_ACCEL_BROWSER_TIMEOUT", 300))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``vlm-accel demo`` in a subprocess on a free localhost port; yields its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlm_accel.cli", "demo", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vlm-accel demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vlm-accel demo did not answer on {url} within {TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(120)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, what: str, timeout: float = TIMEOUT):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: predicate(d))
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / f"timeout-{what.replace(' ', '-')}.png"))
        raise AssertionError(f"timed out waiting for {what}") from None


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _upload(driver, root_id: str, path: Path):
    (field,) = _css(driver, f"#{root_id} input[type=file]")
    field.send_keys(str(path))


def _value(driver, root_id: str) -> str:
    boxes = _css(driver, f"#{root_id} textarea") or _css(driver, f"#{root_id} input")
    return boxes[0].get_attribute("value") if boxes else ""


def _set_text(driver, root_id: str, text: str):
    (box,) = _css(driver, f"#{root_id} textarea")
    box.clear()
    box.send_keys(text)


def _set_number(driver, root_id: str, value: float):
    from selenium.webdriver.common.keys import Keys

    (box,) = _css(driver, f"#{root_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)


def _choose(driver, root_id: str, option: str):
    from selenium.webdriver.common.keys import Keys

    (box,) = _css(driver, f"#{root_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(option)
    _wait(driver, lambda d: any(o.text.strip() == option for o in _css(d, "[role=option]")), f"option {option}")
    next(o for o in _css(driver, "[role=option]") if o.text.strip() == option).click()


def _table_rows(driver) -> list[list[str]]:
    rows = []
    for row in _css(driver, "#table [role=row]"):
        cells = [c.text.strip() for c in row.find_elements("css selector", "[role=gridcell]")]
        if cells:
            rows.append(cells)
    return rows


def _severe_console_errors(driver) -> list[str]:
    try:
        entries = driver.get_log("browser")
    except Exception:  # a driver without the log endpoint
        return []
    return [e["message"] for e in entries if e.get("level") == "SEVERE" and "favicon" not in e["message"]]


def test_image_tab_in_a_real_browser(server, browser):
    url, log = server
    sample = zoo.samples()[0]
    browser.get(url)
    _wait(browser, lambda d: _css(d, "#ask") and _css(d, "#image-input input[type=file]"), "the image tab")
    _upload(browser, "image-input", Path(sample["path"]))
    _wait(browser, lambda d: _css(d, "#image-input img"), "the uploaded image")
    _set_text(browser, "question", sample["question"])
    _css(browser, "#ask")[0].click()
    _wait(browser, lambda d: _value(d, "answer-full") and _value(d, "answer-fast"), "both answers")
    _wait(browser, lambda d: _css(d, "#overlay img") and len(_table_rows(d)) == 2, "overlay and table")
    browser.save_screenshot(str(ARTIFACTS / "image-0.33.png"))
    assert _value(browser, "answer-full") == sample["answer"]
    assert _value(browser, "answer-fast") == sample["answer"]
    rows = _table_rows(browser)
    assert [r[0] for r in rows] == ["all tokens", "accelerated"]
    model, processor = zoo.load_default()  # what the demo's process loaded
    n, views = image_views(model, processor, zoo.load_image(sample["path"]))
    kept = kept_tokens(0.33, n, views)  # budget 0.33 of the sample's visual tokens
    assert [r[2] for r in rows] == [str(n), str(kept)]
    assert f"{kept} of {n}" in _css(browser, "#stats")[0].text

    # budget and method changed in the page: applied on the next click, no restart
    _set_number(browser, "budget", 0.11)
    _choose(browser, "method", "divprune")
    _css(browser, "#ask")[0].click()
    want = [str(n), str(kept_tokens(0.11, n, views))]
    _wait(browser, lambda d: [r[2] for r in _table_rows(d)] == want, "the table at budget 0.11")
    _wait(browser, lambda d: "divprune" in _css(d, "#stats")[0].text, "the method in the stats")
    browser.save_screenshot(str(ARTIFACTS / "image-0.11-divprune.png"))
    assert not _severe_console_errors(browser)
    assert "Traceback" not in log.read_text()


def test_video_tab_and_a_bad_file_in_a_real_browser(server, browser, tmp_path):
    pytest.importorskip("av")
    url, log = server
    browser.get(url)
    _wait(browser, lambda d: [b for b in _css(d, "button[role=tab]") if b.text.strip() == "Video"], "the video tab")
    next(b for b in _css(browser, "button[role=tab]") if b.text.strip() == "Video").click()
    _wait(browser, lambda d: _css(d, "#video-input input[type=file]"), "the video upload")
    _upload(browser, "video-input", SAMPLE_VIDEO)
    _wait(browser, lambda d: _css(d, "#video-input video"), "the uploaded video")
    _css(browser, "#vask")[0].click()
    _wait(browser, lambda d: _value(d, "vanswer") and len(_css(d, "#vgallery img")) >= 8, "the video answer")
    browser.save_screenshot(str(ARTIFACTS / "video.png"))
    stats = _css(browser, "#vstats")[0].text
    assert "frames encoded" in stats and "reused" in stats
    captions = " ".join(e.text for e in _css(browser, "#vgallery"))
    assert "reused from the frame cache" in captions or "reused" in stats

    # a file that is not a video: a message in the page, no traceback
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"this is not a video")
    browser.get(url)
    _wait(browser, lambda d: [b for b in _css(d, "button[role=tab]") if b.text.strip() == "Video"], "the video tab")
    next(b for b in _css(browser, "button[role=tab]") if b.text.strip() == "Video").click()
    _wait(browser, lambda d: _css(d, "#video-input input[type=file]"), "the video upload")
    _upload(browser, "video-input", bad)
    time.sleep(2)
    _css(browser, "#vask")[0].click()
    _wait(browser, lambda d: "cannot read video" in d.find_element("tag name", "body").text, "the error message")
    browser.save_screenshot(str(ARTIFACTS / "video-bad-file.png"))
    body = browser.find_element("tag name", "body").text
    assert "Traceback" not in body
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def test_a_bad_upload_shows_the_demos_message(server, browser, tmp_path):
    """A text file named .png: the demo's own message in the page (#28.5), not Gradio's generic error."""
    url, log = server
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    browser.get(url)
    _wait(browser, lambda d: _css(d, "#ask") and _css(d, "#image-input input[type=file]"), "the image tab")
    _upload(browser, "image-input", bad)
    _set_text(browser, "question", "What color is the circle?")
    _css(browser, "#ask")[0].click()
    _wait(browser, lambda d: "not a readable image file" in d.find_element("tag name", "body").text, "the message")
    browser.save_screenshot(str(ARTIFACTS / "bad-upload.png"))
    assert "upstream Gradio app has raised an exception" not in browser.find_element("tag name", "body").text
