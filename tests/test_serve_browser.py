"""The page of ``medxfer serve`` in a real headless Chromium (Playwright driving Debian's chromium).

Uploads a real BreastMNIST PNG through the page's file input, waits for the answer, and reads the
predicted class and the probability bars back from the DOM; they must match the JSON API. Skips,
saying why, when Playwright or /usr/bin/chromium is missing (CI installs chromium with apt).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import BREAST  # noqa: E402

CHROMIUM = os.environ.get("MEDXFER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SHOT_FOR_PEOPLE = Path("/tmp/serve_page.png")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian) to run the browser test")
    with sync_api.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        except Exception as e:  # noqa: BLE001 - a browser that cannot start here: say why
            pytest.skip(f"Chromium at {CHROMIUM} did not start under Playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_run):
    from medxfer.serve.app import BackgroundServer, ServeConfig, create_app

    with BackgroundServer(create_app(ServeConfig(run_dir=str(tiny_run), engine="torch")), access_log=False) as srv:
        yield srv


def test_page_upload_shows_prediction_matching_api(browser, server, tmp_path):
    from PIL import Image

    img = np.load(BREAST)["test_images"][3]
    png = tmp_path / "breast_3.png"
    Image.fromarray(img).save(png)
    api = httpx.post(server.url + "/v1/predict?explain=true", timeout=60,
                     files=[("files", ("x.png", png.read_bytes(), "image/png"))]).json()
    expected = api["predictions"][0]

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    remote, errors = [], []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector('body[data-model="ready"]', timeout=20_000)  # the page's CSP forbids eval: no wait_for_function
    page.set_input_files("#file", str(png))
    page.wait_for_selector('#result[data-state="done"]', timeout=60_000)
    page.wait_for_selector("#heatmap-fig:not(.hidden)", timeout=20_000)
    page.eval_on_selector("#heatmap", "i => i.decode()")  # wait until the PNG is decoded

    predicted = page.inner_text("#predicted").strip()
    rows = page.eval_on_selector_all(".bar-row", "rs => rs.map(r => [r.dataset.label, parseFloat(r.dataset.prob), "
                                                 "r.querySelector('.value').textContent])")
    heat = page.eval_on_selector("#heatmap", "i => [i.naturalWidth, i.naturalHeight]")
    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    try:
        shutil.copyfile(shot, SHOT_FOR_PEOPLE)
    except OSError:
        pass
    page.close()

    assert predicted == expected["predicted"]
    assert [r[0] for r in rows] == api["labels"]
    for label, prob, text in rows:
        assert abs(prob - expected["probabilities"][label]) < 1e-6
        assert text == f"{100 * expected['probabilities'][label]:.1f}%"
    assert heat == [256, 256]
    assert shot.stat().st_size > 10_000
    assert not remote, f"the page fetched non-local resources: {remote}"
    assert not errors, errors


def test_page_asks_for_the_key_when_the_server_needs_one(browser, tiny_run, tmp_path):
    from PIL import Image

    from medxfer.serve.app import BackgroundServer, ServeConfig, create_app

    key = "browser-key-0123456789"
    png = tmp_path / "breast_5.png"
    Image.fromarray(np.load(BREAST)["test_images"][5]).save(png)
    cfg = ServeConfig(run_dir=str(tiny_run), engine="torch", api_key=key)
    with BackgroundServer(create_app(cfg), access_log=False) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        assert page.is_visible("#api-key")
        page.wait_for_selector('body[data-model="need-key"]', timeout=20_000)
        page.set_input_files("#file", str(png))  # no key yet: a clear error, no result
        page.wait_for_selector('#result[data-state="error"]', timeout=30_000)
        assert "API key" in page.inner_text("#error")
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector('body[data-model="ready"]', timeout=20_000)
        page.set_input_files("#file", str(png))
        page.wait_for_selector('#result[data-state="done"]', timeout=60_000)
        assert page.inner_text("#error") == ""
        api = httpx.post(srv.url + "/v1/predict", headers={"X-API-Key": key}, timeout=60,
                         files=[("files", ("x.png", png.read_bytes(), "image/png"))]).json()
        assert page.inner_text("#predicted").strip() == api["predictions"][0]["predicted"]
        page.close()
