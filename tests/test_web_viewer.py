"""The web viewer in headless Chromium: token form, studies list, a mammogram drawn and windowed.

A real node (``latentpacs serve`` with its web server on an OS-assigned loopback port)
receives phantom mammograms from DCMTK's ``storescu``; Debian's Chromium, driven by
Selenium through Debian's ChromeDriver (never Selenium Manager: nothing is downloaded),
opens ``/``, types the bearer token into the page's form (or, on a node with
``web.trust_loopback``, sees no form), clicks a study and reads the main canvas back
(``getImageData``). The canvas must show the mammogram as an independent rendering of
the archived pixels in this file computes it (Rescale, the image's own window per
PS3.3 C.11.2.1.2, MONOCHROME1 inverted), placed where the page says it drew it; a
window change and a zoom must change what is drawn, in the same way. The page's own
routes are checked over plain HTTP: the page and its files without a token and with a
strict Content-Security-Policy, the summary JSON only with the ``query`` permission.

``LATENTPACS_SCREENSHOT=docs/viewer.png`` also saves the latent-tier study page there
(the README's screenshot).
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.mouse_button import MouseButton
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from dicomtools import require
from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import dimse_responses, storescu
from webpeers import ALL, WebNode, start_web_node

#: Small mammograms: 4 studies of 2 images (phantom profiles 0 to 3): study 0 is 12-bit
#: MONOCHROME1 with a window, study 1 14-bit MONOCHROME2 with a window, study 3 12-bit
#: MONOCHROME2 "FOR PROCESSING" without one (the page windows it to its value range).
SIZE = (512, 416)
COUNT = 8
PER_STUDY = 2
STUDIES = COUNT // PER_STUDY
#: Tokens of the lossless node: everything, query only, retrieve only.
TOKENS = {"admin": ALL, "reader": ("query",), "fetcher": ("retrieve",)}
#: How long the page may take to show what a step asks for (CPU decodes included).
WAIT_S = 120.0
WINDOW_SIZE = (1280, 800)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), COUNT, seed=11, size=SIZE,
                            images_per_study=PER_STUDY, studies_per_patient=2)


def _stored(node: WebNode, files: list[Path]) -> None:
    responses = dimse_responses(storescu(node.node.port, node.node.aet, files))
    assert [r.status for r in responses] == [Status.SUCCESS] * len(files)


def coded(node: WebNode, token: str | None) -> None:
    """Wait until the coding queue has coded every image (no study ``pending``)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        answer = node.request("GET", "/viewer/api/studies", token=token)
        assert answer.status == 200, answer.body
        if not any(study["pending"] for study in json.loads(answer.body)["studies"]):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"images still being coded after {WAIT_S:g} s: {answer.body!r}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def lossless_node(tmp_path_factory: pytest.TempPathFactory, phantoms: list[Path]) -> Iterator[WebNode]:
    with start_web_node(tmp_path_factory.mktemp("lossless"), tier="lossless", tokens=TOKENS) as node:
        _stored(node, phantoms)
        coded(node, "reader")
        yield node


@pytest.fixture(scope="module")
def latent_node(tmp_path_factory: pytest.TempPathFactory, phantoms: list[Path]) -> Iterator[WebNode]:
    with start_web_node(tmp_path_factory.mktemp("latent"), tier="latent",
                        web={"trust_loopback": True}) as node:
        _stored(node, phantoms)
        coded(node, None)
        yield node


def chromium(profile: Path) -> WebDriver:
    """Headless Debian Chromium through Debian's ChromeDriver (no Selenium Manager download)."""
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1",
                 "--hide-scrollbars", f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=ChromeService(executable_path=require("chromedriver")),
                            options=options)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    driver = chromium(Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)))
    try:
        # The page itself WINDOW_SIZE (the window's frame comes on top in headless mode too).
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(2 * WINDOW_SIZE[0] - inner[0], 2 * WINDOW_SIZE[1] - inner[1])
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------ page helpers

def wait(driver: WebDriver, what: str, condition: Any) -> Any:
    """``condition(driver)`` once truthy; a timeout fails with the browser's console."""
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        console = "\n".join(entry["message"] for entry in driver.get_log("browser"))
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"the page did not show {what} within {WAIT_S:g} s; status {status!r}; "
                    f"console:\n{console}")


def state(driver: WebDriver) -> dict[str, Any]:
    """What the page says it draws (``window.latentpacsViewer.state()``)."""
    found: dict[str, Any] = driver.execute_script("return window.latentpacsViewer.state()")
    return found


def snapshot(driver: WebDriver) -> tuple[np.ndarray, dict[str, Any]]:
    """The main canvas's pixels (red channel of ``getImageData``; the page draws gray) and
    the page's state, read in one script run, so no event comes between the two."""
    width, height, data, seen = driver.execute_script("""
        const canvas = document.getElementById("view");
        const rgba = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        const red = new Uint8Array(rgba.length / 4);
        for (let i = 0; i < red.length; i++) red[i] = rgba[4 * i];
        let text = "";
        for (let i = 0; i < red.length; i += 8192) text += String.fromCharCode(...red.subarray(i, i + 8192));
        return [canvas.width, canvas.height, btoa(text), window.latentpacsViewer.state()];
    """)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width), seen


def showing(driver: WebDriver, window: tuple[float, float]) -> dict[str, Any]:
    """The page's state once the canvas shows ``window`` (center, width)."""
    return wait(driver, f"the window {window}", lambda d: (
        seen if (shown := (seen := state(d))["shown"]) and (shown["center"], shown["width"]) == window
        else None))


def check_canvas(driver: WebDriver, image: np.ndarray, *, window: tuple[float, float] | None = None,
                 max_mean_error: float = 1.0, min_correlation: float = 0.99) -> tuple[np.ndarray, dict[str, Any]]:
    """The canvas shows ``image`` (through ``window``, if given) where the page says it drew it."""
    canvas, seen = snapshot(driver)
    if window is not None:
        assert (seen["shown"]["center"], seen["shown"]["width"]) == window, seen["shown"]
    assert_shows(canvas, image, seen["view"], max_mean_error=max_mean_error,
                 min_correlation=min_correlation)
    return canvas, seen


def open_study(driver: WebDriver, study_uid: str) -> dict[str, Any]:
    """Click the study's row link and wait for its first image on the main canvas."""
    link = wait(driver, "the study in the list", lambda d: d.find_elements(
        By.CSS_SELECTOR, f'tr[data-uid="{study_uid}"] a.study-link'))
    link[0].click()
    wait(driver, "an image on the canvas",
         lambda d: d.find_element(By.ID, "view").get_attribute("data-state") == "drawn"
         and state(d)["timing"] is not None)
    return state(driver)


def study_rows(driver: WebDriver, count: int) -> list[WebElement]:
    rows: list[WebElement] = wait(driver, f"{count} studies", lambda d: (
        found if d.find_element(By.ID, "studies").get_attribute("data-state") == "ready"
        and len(found := d.find_elements(By.CSS_SELECTOR, "#studies tbody tr[data-uid]")) == count
        else None))
    return rows


# ------------------------------------------------------------------ the reference rendering

def reference(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """8-bit display values of a file: Rescale, VOI window, MONOCHROME1 inverted.

    PS3.3 C.11.1 (Modality LUT), C.11.2.1.2.1 (LINEAR: ``window``, else the file's own),
    C.11.2.1.3.1 (LINEAR_EXACT over the image's value range when the file has no window),
    C.7.6.3.1.2 (MONOCHROME1); an implementation of its own, so the page is checked
    against the standard, not against the server's rendering.
    """
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if window is None and "WindowCenter" not in ds:
        low, high = values.min(), values.max()
        width = max(high - low, 1.0)
        center = low + width / 2
        display = np.clip(((values - center) / width + 0.5) * 255, 0, 255)
        display[values <= center - width / 2] = 0
    else:
        center, width = window or (float(ds.WindowCenter), float(ds.WindowWidth))
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        display = np.where(values <= low, 0.0, np.where(
            values > high, 255.0, ((values - (center - 0.5)) / (width - 1) + 0.5) * 255))
    display = np.round(display)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        display = 255 - display
    return display.astype(np.uint8)


def placed(image: np.ndarray, view: dict[str, float], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` drawn at ``view`` (scale, tx, ty) on a canvas of ``shape``, nearest neighbour.

    Returns the expected canvas (black outside the image) and the mask of canvas pixels
    whose centre lies inside the image, away from its edges (where smoothing may blend).
    """
    height, width = shape
    ys = (np.arange(height) + 0.5 - view["ty"]) / view["scale"]
    xs = (np.arange(width) + 0.5 - view["tx"]) / view["scale"]
    rows, cols = image.shape
    inside_y = (ys >= 1) & (ys < rows - 1)
    inside_x = (xs >= 1) & (xs < cols - 1)
    expected = image[np.clip(ys.astype(int), 0, rows - 1)][:, np.clip(xs.astype(int), 0, cols - 1)]
    mask = inside_y[:, None] & inside_x[None, :]
    outside = ~(((ys >= 0) & (ys < rows))[:, None] & ((xs >= 0) & (xs < cols))[None, :])
    expected = np.where(outside, 0, expected)
    return expected, mask


def assert_shows(canvas: np.ndarray, image: np.ndarray, view: dict[str, float], *,
                 max_mean_error: float, min_correlation: float) -> None:
    """The canvas shows ``image`` where the page says it put it, and black around it."""
    expected, mask = placed(image, view, canvas.shape)
    shown, wanted = canvas[mask].astype(float), expected[mask].astype(float)
    assert mask.sum() > 10000, "the image covers almost nothing of the canvas"
    assert shown.std() > 20, "the canvas is blank where the image should be"
    tissue = (shown > 30).mean()
    assert 0.15 < tissue < 0.9, f"no breast on a dark background ({tissue:.0%} of the image lit)"
    error = np.abs(shown - wanted).mean()
    correlation = np.corrcoef(shown, wanted)[0, 1]
    assert error <= max_mean_error and correlation >= min_correlation, (
        f"the canvas differs from the image: mean |error| {error:.2f}, correlation {correlation:.3f}")
    hidden_expected, _ = placed(np.full_like(image, 255), view, canvas.shape)
    background = canvas[hidden_expected == 0]
    if background.size:
        assert background.max() == 0, "the canvas outside the image is not black"


def file_of(files: list[Path], study_uid: str) -> list[Path]:
    """The files of one study, in instance number order."""
    chosen = [(pydicom.dcmread(path, stop_before_pixels=True), path) for path in files]
    return [path for ds, path in sorted(chosen, key=lambda item: int(item[0].InstanceNumber))
            if ds.StudyInstanceUID == study_uid]


def thumbnails_loaded(driver: WebDriver) -> bool:
    """Whether every thumbnail of the study has arrived and decoded."""
    return bool(driver.execute_script("""
        const images = [...document.querySelectorAll(".thumb img")];
        return images.length === arguments[0] && images.every((i) => i.complete && i.naturalWidth > 0);
    """, PER_STUDY))


def type_into(element: WebElement, text: str) -> None:
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    element.send_keys(text, Keys.TAB)


# ------------------------------------------------------------------ HTTP: the page's own routes

def test_the_page_is_served_without_a_token_and_under_a_strict_policy(lossless_node: WebNode) -> None:
    page = lossless_node.request("GET", "/", token=None)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
    assert b"<script>" not in page.body and b"style=" not in page.body, "inline script or style"
    for name, media in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        asset = lossless_node.request("GET", f"/viewer/static/{name}", token=None)
        assert asset.status == 200 and asset.headers["content-type"].startswith(media), name
    for missing in ("/viewer/static/nothing.js", "/viewer/static/..%2Fviewer.py",
                    "/viewer/static/.hidden.js"):
        assert lossless_node.request("GET", missing, token=None).status == 404, missing


def test_the_summary_route_needs_the_query_permission_and_gives_tier_and_ratio(
        lossless_node: WebNode, phantoms: list[Path]) -> None:
    assert lossless_node.request("GET", "/viewer/api/studies", token=None).status == 401
    assert lossless_node.request("GET", "/viewer/api/studies", token="fetcher").status == 403
    answer = lossless_node.request("GET", "/viewer/api/studies", token="reader")
    assert answer.status == 200
    studies = json.loads(answer.body)["studies"]
    uids = list(dict.fromkeys(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
                              for path in phantoms))
    assert [study["StudyInstanceUID"] for study in studies] == uids
    for study in studies:
        assert study["instances"] == PER_STUDY and study["tiers"] == ["lossless"]
        assert study["original_bytes"] == PER_STUDY * SIZE[0] * SIZE[1] * 2
        assert study["ratio"] == pytest.approx(study["original_bytes"] / study["archived_bytes"], abs=0.01)
        assert study["ratio"] > 1.0 and study["pending"] == 0
    one = json.loads(lossless_node.request(
        "GET", f"/viewer/api/studies?StudyInstanceUID={uids[1]}&limit=5", token="reader").body)
    assert [study["StudyInstanceUID"] for study in one["studies"]] == [uids[1]]
    paged = json.loads(lossless_node.request("GET", "/viewer/api/studies?limit=1&offset=1",
                                             token="reader").body)
    assert [study["StudyInstanceUID"] for study in paged["studies"]] == [uids[1]]
    instances = json.loads(lossless_node.request(
        "GET", f"/viewer/api/studies/{uids[0]}/instances", token="reader").body)
    sent = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in file_of(phantoms, uids[0])}
    assert {row["SOPInstanceUID"] for row in instances["instances"]} == sent
    assert instances["truncated"] is False
    for bad in ("/viewer/api/studies?StudyInstanceUID=1.2.x", "/viewer/api/studies?limit=0",
                "/viewer/api/studies?limit=100000", "/viewer/api/studies?offset=-1",
                "/viewer/api/studies/1.2.3.a/instances"):
        assert lossless_node.request("GET", bad, token="reader").status == 400, bad
    nothing = json.loads(lossless_node.request("GET", "/viewer/api/studies/1.2.3/instances",
                                               token="reader").body)
    assert nothing["instances"] == []


# ------------------------------------------------------------------ the browser

def test_with_a_token_a_lossless_mammogram_is_drawn_windowed_and_zoomed(
        lossless_node: WebNode, phantoms: list[Path], browser: WebDriver, tmp_path: Path) -> None:
    browser.get(lossless_node.url + "/")
    form = wait(browser, "the token form", lambda d: d.find_element(By.ID, "token-dialog").is_displayed())
    assert form
    assert "needs a bearer token" in browser.find_element(By.ID, "token-message").text
    browser.find_element(By.ID, "token-input").send_keys("not-a-token")
    browser.find_element(By.ID, "token-submit").click()
    wait(browser, "the token refused", lambda d: "not accepted" in d.find_element(By.ID, "token-message").text
         and d.find_element(By.ID, "token-dialog").is_displayed())
    browser.find_element(By.ID, "token-input").send_keys(lossless_node.tokens["admin"])
    browser.find_element(By.ID, "token-submit").click()

    rows = study_rows(browser, STUDIES)
    first = pydicom.dcmread(phantoms[0], stop_before_pixels=True)
    row = next(r for r in rows if r.get_attribute("data-uid") == first.StudyInstanceUID)
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    date = f"{first.StudyDate[:4]}-{first.StudyDate[4:6]}-{first.StudyDate[6:]}"
    assert cells[1:5] == [first.PatientID, date, first.StudyDescription, str(PER_STUDY)]
    assert cells[5] == "lossless" and re.fullmatch(r"\d+(\.\d+)?:1", cells[6]), cells
    assert browser.find_element(By.ID, "token-dialog").is_displayed() is False

    study_files = file_of(phantoms, first.StudyInstanceUID)
    assert first.PhotometricInterpretation == "MONOCHROME1" and "WindowCenter" in first
    shown = open_study(browser, first.StudyInstanceUID)
    assert shown["mode"] == "frames" and (shown["rows"], shown["cols"]) == SIZE
    own = (float(first.WindowCenter), float(first.WindowWidth))
    assert (shown["window"]["center"], shown["window"]["width"]) == own
    image = reference(study_files[0])
    browser.save_screenshot(str(tmp_path / "lossless.png"))
    canvas, _ = check_canvas(browser, image, window=own)
    badge = browser.find_element(By.ID, "badge").text
    assert badge.startswith("LOSSLESS") and "tier lossless" in badge, badge

    # Window: typed into the inputs, then dragged with shift held.
    narrower = (float(round(own[0] + own[1] / 8)), float(round(own[1] / 3)))
    type_into(browser.find_element(By.ID, "wc"), f"{narrower[0]:g}")
    type_into(browser.find_element(By.ID, "ww"), f"{narrower[1]:g}")
    showing(browser, narrower)
    windowed, before = check_canvas(browser, reference(study_files[0], narrower), window=narrower)
    assert np.abs(windowed.astype(int) - canvas).mean() > 5, "a narrower window changed nothing"

    view = browser.find_element(By.ID, "view")
    ActionChains(browser).key_down(Keys.SHIFT).click_and_hold(view).move_by_offset(80, 40) \
        .release().key_up(Keys.SHIFT).perform()
    dragged = wait(browser, "a dragged window", lambda d: state(d) if (
        state(d)["shown"]["width"] > narrower[1] and not d.find_elements(By.CSS_SELECTOR, "#view.windowing"))
        else None)
    dragged = showing(browser, (dragged["window"]["center"], dragged["window"]["width"]))
    assert dragged["shown"]["center"] > narrower[0], "dragging down did not raise the center"
    assert dragged["view"] == before["view"], "a window drag moved the image"
    dragged_window = (dragged["shown"]["center"], dragged["shown"]["width"])
    check_canvas(browser, reference(study_files[0], dragged_window), window=dragged_window)
    # The same with the right button: up and to the left lowers the center and narrows.
    right = ActionBuilder(browser)
    right.pointer_action.move_to(view).pointer_down(MouseButton.RIGHT).move_by(-50, -30) \
        .pointer_up(MouseButton.RIGHT)
    right.perform()
    right_dragged = wait(browser, "a right-dragged window", lambda d: state(d) if (
        state(d)["window"]["width"] < dragged_window[1] and not d.find_elements(By.CSS_SELECTOR, "#view.windowing"))
        else None)
    right_window = (right_dragged["window"]["center"], right_dragged["window"]["width"])
    showing(browser, right_window)
    assert right_window[0] < dragged_window[0], "dragging up did not lower the center"
    check_canvas(browser, reference(study_files[0], right_window), window=right_window)

    # Reset: the image's own window again, fitted.
    browser.find_element(By.ID, "reset").click()
    showing(browser, own)
    _, fitted = check_canvas(browser, image, window=own)

    # Zoom in with the wheel over the canvas: bigger, and still the same image.
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(view), 0, -400).perform()
    wait(browser, "a zoom", lambda d: state(d)["view"]["scale"] > fitted["view"]["scale"] * 1.2)
    zoomed_canvas, zoomed = check_canvas(browser, image, window=own)
    assert np.abs(zoomed_canvas.astype(int) - canvas).mean() > 5, "zooming changed nothing"

    # Pan by dragging: the image moves by the drag.
    ActionChains(browser).click_and_hold(view).move_by_offset(-60, 30).release().perform()
    wait(browser, "the pan's end", lambda d: not d.find_elements(By.CSS_SELECTOR, "#view.dragging"))
    _, panned = check_canvas(browser, image, window=own)
    assert panned["view"]["scale"] == zoomed["view"]["scale"]
    assert panned["view"]["tx"] == pytest.approx(zoomed["view"]["tx"] - 60, abs=1)
    assert panned["view"]["ty"] == pytest.approx(zoomed["view"]["ty"] + 30, abs=1)

    # Rendered by the server instead (WADO-RS /rendered, window= on a change): the same pictures.
    browser.find_element(By.ID, "server-render").click()
    wait(browser, "the server's rendering", lambda d: (state(d)["timing"] or {}).get("mode") == "rendered")
    check_canvas(browser, image, window=own)
    type_into(browser.find_element(By.ID, "wc"), f"{narrower[0]:g}")
    type_into(browser.find_element(By.ID, "ww"), f"{narrower[1]:g}")
    showing(browser, narrower)
    check_canvas(browser, reference(study_files[0], narrower), window=narrower)
    browser.find_element(By.ID, "server-render").click()
    wait(browser, "the page's own windowing again", lambda d: (state(d)["timing"] or {}).get("mode") == "frames")

    # Every thumbnail arrives (rendered, fetched with the token) and is labelled.
    wait(browser, "the thumbnails", thumbnails_loaded)
    thumbs = browser.find_elements(By.CSS_SELECTOR, ".thumb")
    assert all(thumb.find_element(By.CLASS_NAME, "badge").text == "lossless" for thumb in thumbs)
    browser.save_screenshot(str(tmp_path / "lossless-zoomed.png"))

    # Back to the list, into a study without a window: windowed to the image's value range.
    browser.find_element(By.ID, "home").click()
    study_rows(browser, STUDIES)
    unwindowed = [path for path in phantoms
                  if "WindowCenter" not in pydicom.dcmread(path, stop_before_pixels=True)]
    assert unwindowed, "the phantoms hold no image without a window"
    study = pydicom.dcmread(unwindowed[0], stop_before_pixels=True).StudyInstanceUID
    plain = open_study(browser, study)
    assert plain["window"]["fn"] == "LINEAR_EXACT"
    check_canvas(browser, reference(file_of(phantoms, study)[0]))


def test_on_a_trusted_loopback_a_latent_study_is_drawn_and_labelled_lossy(
        latent_node: WebNode, phantoms: list[Path], browser: WebDriver, tmp_path: Path) -> None:
    browser.get(latent_node.url + "/")
    rows = study_rows(browser, STUDIES)
    assert browser.find_element(By.ID, "token-dialog").is_displayed() is False
    second = pydicom.dcmread(file_of(phantoms, pydicom.dcmread(phantoms[PER_STUDY]).StudyInstanceUID)[0])
    row = next(r for r in rows if r.get_attribute("data-uid") == second.StudyInstanceUID)
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[5] == "latent" and re.fullmatch(r"[\d,]+(\.\d+)?:1", cells[6]), cells

    assert second.PhotometricInterpretation == "MONOCHROME2"
    shown = open_study(browser, second.StudyInstanceUID)
    assert shown["mode"] == "frames" and (shown["rows"], shown["cols"]) == SIZE
    # The reconstruction, not the original: close to it, windowed the same way.
    check_canvas(browser, reference(file_of(phantoms, second.StudyInstanceUID)[0]),
                 max_mean_error=40.0, min_correlation=0.8)

    series = dict((sop, series) for series, sop in _effective(latent_node, second.StudyInstanceUID))
    assert shown["sop"] in series and shown["sop"] != second.SOPInstanceUID, "not the derived image"
    metadata = json.loads(latent_node.request(
        "GET", f"/dicom-web/studies/{second.StudyInstanceUID}/series/{series[shown['sop']]}"
               f"/instances/{shown['sop']}/metadata", token=None,
        headers={"Accept": "application/dicom+json"}).body)[0]
    assert metadata["00282110"]["Value"] == ["01"]
    badge = browser.find_element(By.ID, "badge").text
    assert badge.startswith("LOSSY") and "tier latent" in badge, badge
    for method in metadata["00282114"]["Value"]:
        assert method in badge
    wait(browser, "the thumbnails", thumbnails_loaded)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".thumb .badge.lossy")) == PER_STUDY
    browser.save_screenshot(str(tmp_path / "latent.png"))
    target = os.environ.get("LATENTPACS_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(target)


def _effective(node: WebNode, study_uid: str) -> list[tuple[str, str]]:
    """(Series, SOP Instance UID) of a study's instances, as QIDO-RS names them."""
    answer = node.request("GET", f"/dicom-web/studies/{study_uid}/instances?includefield=0020000E",
                          token=None, headers={"Accept": "application/dicom+json"})
    return [(item["0020000E"]["Value"][0], item["00080018"]["Value"][0]) for item in json.loads(answer.body)]
