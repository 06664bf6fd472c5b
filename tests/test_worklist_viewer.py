"""The study page's DICOM viewer (issue 15), in headless Chromium against the real `interop serve`
and Orthanc: Cornerstone3D, served by the hub itself (static/vendor), reads the report's study
through the hub's read-only WADO-RS proxy. Screenshots of the viewer are checked by the test: the
image is drawn (not a blank canvas), a window/level drag changes the pixels, the arrow keys scroll
a CT series, a mammography exam shows its four views side by side. Also the proxy's rules."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from inference_client.models import load_models
from interop.dicom.study import imaging_study
from interop.domain import report
from interop.domain.vocabulary import site_tag
from interop.store import resources
from interop.store.db import connect
from interop.store.search_params import load
from scripts.synthetic.dicom import dataset_bytes, make_chest_xray, make_ct_head_series, make_mammography_exam
from tests.fixtures.auth import PASSWORD, add_person, csrf_of
from tests.helpers import ROOT

MODELS = load_models(ROOT / "mappings")
PARAMS = load(ROOT / "mappings")
READER = "BS. Lê Thị Hoa"


def stored_report(db_url: str, orthanc: Any, datasets: list[Any], model: str, mrn: str) -> dict[str, Any]:
    """The datasets in the PACS, their ImagingStudy and an AI report on them, as the worker stores them."""
    for ds in datasets:
        orthanc.upload(dataset_bytes(ds))
    described = MODELS[model]
    with connect(db_url, autocommit=True) as conn, conn.transaction():
        patient = resources.create(conn, {"resourceType": "Patient", "identifier": [
            {"system": "urn:test:mrn", "value": mrn}]}, PARAMS["Patient"])
        body = imaging_study(datasets, subject=f"Patient/{patient['id']}", endpoint_address=orthanc.dicomweb_url)
        body["meta"] = {"tag": [site_tag("BVDKDN")]}
        study = resources.create(conn, body, PARAMS["ImagingStudy"])
        built = report.build(study=study, study_uid=str(datasets[0].StudyInstanceUID), model=described,
                             version=described.version, probabilities=[0.1] * len(described.labels),
                             report_id=resources.new_id(), observation_ids=[resources.new_id() for _ in described.labels],
                             issued="2026-12-01T08:00:00+00:00")
        if not conn.execute("SELECT 1 FROM resource WHERE id = %s", (built["device"]["id"],)).fetchone():
            resources.create(conn, built["device"], PARAMS["Device"], rid=built["device"]["id"])
        for obs in built["observations"]:
            resources.create(conn, obs, PARAMS["Observation"], rid=obs["id"])
        built["report"]["meta"] = {"tag": [site_tag("BVDKDN")]}
        return resources.create(conn, built["report"], PARAMS["DiagnosticReport"], rid=built["report"]["id"])


def log_in(page: Any, hub: Any, db_url: str) -> None:
    add_person(db_url, READER, "radiologist")
    page.goto(f"{hub.base}/worklist/?lang=en")
    page.fill("#username", READER)
    page.fill("#password", PASSWORD)
    page.click("#login-button", navigates=True)


def shot(page: Any, selector: str, path: Path) -> np.ndarray[Any, Any]:
    """A screenshot of one element, as greyscale pixels (saved for a person to look at)."""
    box = page.evaluate(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
                        " return {x: r.left, y: r.top, width: r.width, height: r.height}; })()")
    data = page.send("Page.captureScreenshot", {"format": "png", "clip": {**box, "scale": 1}})["data"]
    png = base64.b64decode(data)
    path.write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def drag(page: Any, selector: str, dx: float, dy: float, button: str = "left") -> None:
    """A real mouse drag from the element's centre (pressed, moved in steps, released)."""
    box = page.evaluate(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
                        " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()")
    mask = {"left": 1, "right": 2, "middle": 4}[button]
    x, y = box["x"], box["y"]
    page.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
    page.send("Input.dispatchMouseEvent", {"type": "mousePressed", "x": x, "y": y, "button": button,
                                           "buttons": mask, "clickCount": 1})
    for i in range(1, 11):
        page.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x + dx * i / 10, "y": y + dy * i / 10,
                                               "button": button, "buttons": mask})
    page.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": x + dx, "y": y + dy, "button": button,
                                           "buttons": 0, "clickCount": 1})


def key(page: Any, name: str, code: int) -> None:
    for kind in ("keyDown", "keyUp"):
        page.send("Input.dispatchKeyEvent", {"type": kind, "key": name, "code": name, "windowsVirtualKeyCode": code})


def study_page(page: Any, hub: Any, db_url: str, orthanc: Any, datasets: list[Any], model: str, mrn: str) -> None:
    """The datasets stored with an AI report on them (`stored_report`), and the report's study page
    opened by a logged-in radiologist."""
    rep = stored_report(db_url, orthanc, datasets, model, mrn)
    log_in(page, hub, db_url)
    page.goto(f"{hub.base}/worklist/{rep['id']}?lang=en")


def painted(page: Any) -> None:
    """Wait two animation frames: what the last input changed is on screen."""
    page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def ready(page: Any) -> None:
    page.wait_for("document.getElementById('dicom-viewer').dataset.state !== 'loading'"
                  " && document.getElementById('dicom-viewer').dataset.state !== 'idle'", timeout=90)
    state = page.evaluate("document.getElementById('dicom-viewer').dataset.state")
    assert state == "ready", (state, page.errors())


def test_viewer_draws_and_windows_a_radiograph(hub: Any, db_url: str, orthanc: Any, page: Any, tmp_path: Path) -> None:
    study_page(page, hub, db_url, orthanc, [make_chest_xray(seed=31, size=512)], "chest-xray", "V-1")
    assert page.evaluate("!!window.hubCornerstone")  # the hub's own bundle, no CDN
    ready(page)
    assert page.evaluate("document.querySelectorAll('.viewer-element canvas').length") >= 1
    before = shot(page, "#viewer-vp0", tmp_path / "viewer-before.png")
    assert before.std() > 20 and before.max() - before.min() > 100, "the viewer drew a blank canvas"

    drag(page, "#viewer-vp0", 150, 90)  # window/level: the left button
    painted(page)
    after = shot(page, "#viewer-vp0", tmp_path / "viewer-after.png")
    assert before.shape == after.shape
    assert float(np.abs(after - before).mean()) > 5, "window/level changed nothing on screen"
    voi = page.evaluate("(() => { const vp = window.hubCornerstone.core.getRenderingEngine('hub-engine')"
                        ".getViewport('vp0'); const r = vp.getProperties().voiRange; return [r.lower, r.upper]; })()")
    ds = make_chest_xray(seed=31, size=512)
    width = float(ds.WindowWidth)
    assert abs((voi[1] - voi[0]) - width) > 1, (voi, width)  # no longer the header's window

    key(page, "w", 87)  # W: reset to the header's window
    painted(page)
    reset = shot(page, "#viewer-vp0", tmp_path / "viewer-reset.png")
    assert float(np.abs(reset - before).mean()) < float(np.abs(after - before).mean())

    drag(page, "#viewer-vp0", 0, -120, button="right")  # zoom
    painted(page)
    zoomed = shot(page, "#viewer-vp0", tmp_path / "viewer-zoom.png")
    assert float(np.abs(zoomed - reset).mean()) > 2, "zoom changed nothing on screen"
    assert page.errors() == [] or all("401" in e for e in page.errors()), page.errors()


def test_viewer_scrolls_a_ct_series(hub: Any, db_url: str, orthanc: Any, page: Any, tmp_path: Path) -> None:
    series = make_ct_head_series(seed=7, slices=12, size=128)
    study_page(page, hub, db_url, orthanc, series, "brain-ct", "V-2")
    ready(page)
    index = "window.hubCornerstone.core.getRenderingEngine('hub-engine').getViewport('vp0').getCurrentImageIdIndex()"
    assert page.evaluate("window.hubCornerstone.core.getRenderingEngine('hub-engine').getViewport('vp0')"
                         ".getImageIds().length") == 12
    start = page.evaluate(index)
    first = shot(page, "#viewer-vp0", tmp_path / "ct-a.png")
    assert first.std() > 10
    page.wait_for(f"document.getElementById('viewer-vp0').dataset.slice === '{start}'")
    for _ in range(4):
        key(page, "ArrowDown", 40)
    page.wait_for(f"{index} === {start + 4} && document.getElementById('viewer-vp0').dataset.slice === '{start + 4}'")
    painted(page)
    assert page.evaluate("document.querySelector('.viewer-slice').textContent") == f"{start + 5} / 12"
    later = shot(page, "#viewer-vp0", tmp_path / "ct-b.png")
    assert float(np.abs(later - first).mean()) > 1, "another slice, the same pixels"


def test_viewer_hangs_four_mammography_views(hub: Any, db_url: str, orthanc: Any, page: Any, tmp_path: Path) -> None:
    exam = make_mammography_exam(seed=3, rows=416, cols=320)
    study_page(page, hub, db_url, orthanc, exam, "mammography", "V-3")
    ready(page)
    labels = page.evaluate("[...document.querySelectorAll('.viewer-label')].map(e => e.textContent)")
    assert labels == ["RCC", "LCC", "RMLO", "LMLO"]
    boxes = page.evaluate("[...document.querySelectorAll('.viewer-element')].map(e => e.getBoundingClientRect().left)")
    assert boxes == sorted(boxes) and len(set(boxes)) == 4  # side by side, left to right
    for i in range(4):
        pixels = shot(page, f"#viewer-vp{i}", tmp_path / f"mg-{i}.png")
        assert pixels.std() > 10, f"view {labels[i]} is blank"


def test_wado_proxy_rules(hub: Any, db_url: str, orthanc: Any) -> None:
    import requests

    ds = make_chest_xray(seed=32, size=256)
    rep = stored_report(db_url, orthanc, [ds], "chest-xray", "V-4")
    other = make_chest_xray(seed=33, size=256)
    orthanc.upload(dataset_bytes(other))  # in the PACS, but no report points at it
    add_person(db_url, READER, "radiologist")
    add_person(db_url, "clinician-v", "clinician", "BVDKDN")

    def session(name: str) -> requests.Session:
        s = requests.Session()
        form = s.get(f"{hub.base}/login", timeout=10)
        answer = s.post(f"{hub.base}/login", data={"username": name, "password": PASSWORD, "next": "/worklist/",
                                                   "csrf_token": csrf_of(form.text)}, timeout=10, allow_redirects=False)
        assert answer.status_code == 303, answer.text
        return s

    reader = session(READER)
    layout = reader.get(f"{hub.base}/worklist/{rep['id']}/viewer.json", timeout=30)
    assert layout.status_code == 200, layout.text
    found = layout.json()
    assert found["study"] == ds.StudyInstanceUID and "views" not in found
    item = found["series"][0]["instances"][0]
    assert item == {"series": ds.SeriesInstanceUID, "uid": ds.SOPInstanceUID}
    url = f"{hub.base}{found['wado']}/series/{item['series']}/instances/{item['uid']}"
    part10 = reader.get(url, timeout=30)
    assert part10.status_code == 200 and part10.headers["Content-Type"] == "application/dicom"
    read = pydicom.dcmread(io.BytesIO(part10.content))
    assert read.SOPInstanceUID == ds.SOPInstanceUID and read.pixel_array.shape == (256, 256)
    multipart = reader.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
    assert multipart.status_code == 200 and multipart.headers["Content-Type"].startswith("multipart/related")
    assert part10.content in multipart.content

    # another study than the report's, or an instance the study does not hold: not served
    assert reader.get(f"{hub.base}/worklist/{rep['id']}/dicom-web/studies/{other.StudyInstanceUID}/series/"
                      f"{other.SeriesInstanceUID}/instances/{other.SOPInstanceUID}", timeout=30).status_code == 404
    assert reader.get(f"{hub.base}{found['wado']}/series/{other.SeriesInstanceUID}/instances/{other.SOPInstanceUID}",
                      timeout=30).status_code == 404
    # a clinician (the PNG is theirs) and nobody logged in: no DICOM
    assert session("clinician-v").get(url, timeout=30).status_code == 403
    anonymous = requests.get(url, timeout=30, allow_redirects=False)
    assert anonymous.status_code in (302, 303, 401)
    assert reader.post(url, timeout=30).status_code in (403, 405)  # read-only
