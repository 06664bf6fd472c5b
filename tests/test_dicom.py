"""The DICOM boundary against a real Orthanc: QIDO-RS search, WADO-RS retrieval, pixel pipeline."""
from __future__ import annotations

import copy
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from interop.dicom import DicomError, NotAnImage, PacsUnavailable, StudyNotFound
from interop.dicom.dicomweb import DicomWebClient, InstanceRef, multipart_boundary, parse_multipart
from interop.dicom.pixels import preprocess, to_display_array, window
from scripts.peers.orthanc import Orthanc
from scripts.synthetic.dicom import (
    BASIC_TEXT_SR,
    DX_FOR_PRESENTATION,
    dataset_bytes,
    make_chest_xray,
    make_non_image,
)


def pydicom_file(name: str) -> Dataset:
    """A file shipped inside pydicom (never downloaded: a missing one fails the test)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return dcmread(path)


def renamed(ds: Dataset, accession: str) -> Dataset:
    """A copy with new series/instance UIDs and an accession number (the test files share UIDs)."""
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID = generate_uid()
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.AccessionNumber = accession
    return out


@dataclass
class Uploaded:
    chest: Dataset
    report: Dataset
    others: dict[str, Dataset]


@pytest.fixture(scope="module")
def uploaded(orthanc: Orthanc) -> Uploaded:
    chest = make_chest_xray(7, accession="ACC-CXR-7", patient_id="TEST-7")
    report = make_non_image(chest.StudyInstanceUID, "sr", accession="ACC-CXR-7", patient_id="TEST-7")
    others = {
        "CT_small.dcm": renamed(pydicom_file("CT_small.dcm"), "ACC-CT"),
        "MR_small.dcm": renamed(pydicom_file("MR_small.dcm"), "ACC-MR"),
        "MR_small_RLE.dcm": renamed(pydicom_file("MR_small_RLE.dcm"), "ACC-MR-RLE"),
        "MR_small_jp2klossless.dcm": renamed(pydicom_file("MR_small_jp2klossless.dcm"), "ACC-MR-J2K"),
    }
    for ds in [chest, report, *others.values()]:
        assert orthanc.upload(dataset_bytes(ds))["Status"] == "Success"
    return Uploaded(chest, report, others)


@pytest.fixture
def dicomweb(orthanc: Orthanc) -> Iterator[DicomWebClient]:
    with DicomWebClient(orthanc.dicomweb_url, timeout_s=10) as c:
        yield c


# -- the peer ------------------------------------------------------------------------------------
def test_orthanc_runs_on_loopback_without_remote_access(orthanc: Orthanc) -> None:
    assert orthanc.running
    assert orthanc.url.startswith("http://127.0.0.1:")
    config = orthanc.config_path.read_text()
    assert '"RemoteAccessAllowed": false' in config
    assert orthanc.startup_seconds is not None and orthanc.startup_seconds < 30


# -- QIDO-RS -------------------------------------------------------------------------------------
def test_search_finds_chest_radiograph_and_report_with_their_facts(dicomweb: DicomWebClient, uploaded: Uploaded) -> None:
    refs = dicomweb.search_instances(uploaded.chest.StudyInstanceUID)
    by_uid = {ref.instance_uid: ref for ref in refs}
    assert set(by_uid) == {uploaded.chest.SOPInstanceUID, uploaded.report.SOPInstanceUID}

    image = by_uid[uploaded.chest.SOPInstanceUID]
    assert image == InstanceRef(
        study_uid=uploaded.chest.StudyInstanceUID,
        series_uid=uploaded.chest.SeriesInstanceUID,
        instance_uid=uploaded.chest.SOPInstanceUID,
        sop_class_uid=DX_FOR_PRESENTATION,
        modality="DX",
        body_part="CHEST",
        view_position="PA",
        series_description="CHEST PA",
        rows=2048,
        columns=2048,
        number_of_frames=None,
        instance_number=1,
    )
    assert image.probably_image

    report = by_uid[uploaded.report.SOPInstanceUID]
    assert report.modality == "SR"
    assert report.sop_class_uid == BASIC_TEXT_SR
    assert report.rows is None
    assert not report.probably_image


@pytest.mark.parametrize("name, modality", [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_search_finds_pydicom_test_files(dicomweb: DicomWebClient, uploaded: Uploaded, name: str, modality: str) -> None:
    ds = uploaded.others[name]
    refs = dicomweb.search_instances(ds.StudyInstanceUID)
    ref = next(r for r in refs if r.instance_uid == ds.SOPInstanceUID)
    assert ref.modality == modality
    assert (ref.rows, ref.columns) == (ds.Rows, ds.Columns)
    assert ref.sop_class_uid == ds.SOPClassUID


def test_unknown_study_is_study_not_found(dicomweb: DicomWebClient, orthanc: Orthanc) -> None:
    with pytest.raises(StudyNotFound) as caught:
        dicomweb.search_instances(generate_uid())
    assert not caught.value.is_transient
    assert caught.value.reason


# -- WADO-RS -------------------------------------------------------------------------------------
def test_retrieve_returns_the_same_instance_and_identical_pixels(dicomweb: DicomWebClient, uploaded: Uploaded) -> None:
    refs = dicomweb.search_instances(uploaded.chest.StudyInstanceUID)
    ref = next(r for r in refs if r.instance_uid == uploaded.chest.SOPInstanceUID)
    ds = dicomweb.retrieve_instance(ref)
    assert ds.SOPInstanceUID == uploaded.chest.SOPInstanceUID
    assert ds.PixelData == uploaded.chest.PixelData
    assert (ds.Rows, ds.Columns, ds.BitsStored) == (2048, 2048, 12)
    assert ds.WindowCenter == uploaded.chest.WindowCenter


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_retrieve_pydicom_test_files_decodes_identical_pixels(
    dicomweb: DicomWebClient, uploaded: Uploaded, name: str
) -> None:
    original = uploaded.others[name]
    ref = next(r for r in dicomweb.search_instances(original.StudyInstanceUID) if r.instance_uid == original.SOPInstanceUID)
    ds = dicomweb.retrieve_instance(ref)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
    np.testing.assert_array_equal(to_display_array(ds), to_display_array(original))


def test_retrieved_report_is_not_an_image(dicomweb: DicomWebClient, uploaded: Uploaded) -> None:
    refs = dicomweb.search_instances(uploaded.chest.StudyInstanceUID)
    ref = next(r for r in refs if r.instance_uid == uploaded.report.SOPInstanceUID)
    ds = dicomweb.retrieve_instance(ref)
    with pytest.raises(NotAnImage) as caught:
        to_display_array(ds)
    assert not caught.value.is_transient


def test_unknown_instance_is_not_found(dicomweb: DicomWebClient, uploaded: Uploaded) -> None:
    ref = InstanceRef(uploaded.chest.StudyInstanceUID, uploaded.chest.SeriesInstanceUID, generate_uid())
    with pytest.raises(StudyNotFound):
        dicomweb.retrieve_instance(ref)


# -- a PACS that is down, slow or failing ----------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_closed_port_is_pacs_unavailable_quickly() -> None:
    dicomweb = DicomWebClient(f"http://127.0.0.1:{_closed_port()}/dicom-web", timeout_s=5)
    began = time.monotonic()
    with pytest.raises(PacsUnavailable) as caught:
        dicomweb.search_instances(generate_uid())
    assert time.monotonic() - began < 2
    assert caught.value.is_transient
    assert "127.0.0.1" not in caught.value.reason


def test_silent_pacs_times_out_as_pacs_unavailable() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        dicomweb = DicomWebClient(f"http://127.0.0.1:{port}/dicom-web", timeout_s=0.5)
        began = time.monotonic()
        with pytest.raises(PacsUnavailable, match="timed out"):
            dicomweb.search_instances(generate_uid())
        assert time.monotonic() - began < 3


class _Failing(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        body = b"patient DOE^JANE is not here"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def failing_pacs() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status, error, transient",
                         [(503, PacsUnavailable, True), (500, PacsUnavailable, True), (400, DicomError, False)])
def test_http_errors_are_mapped(
    failing_pacs: http.server.HTTPServer, status: int, error: type[DicomError], transient: bool
) -> None:
    _Failing.status = status
    dicomweb = DicomWebClient(f"http://127.0.0.1:{failing_pacs.server_address[1]}/dicom-web", timeout_s=5)
    with pytest.raises(error) as caught:
        dicomweb.search_instances(generate_uid())
    assert caught.value.is_transient is transient
    assert caught.value.status == status
    assert "DOE" not in caught.value.reason


# -- multipart parsing (pure) ----------------------------------------------------------------------
def test_multipart_parser_handles_quoted_boundary_preamble_and_two_parts() -> None:
    content_type = 'multipart/related; type="application/dicom"; boundary="b0und:ary"'
    body = (
        b"preamble\r\n--b0und:ary\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--body--"
        b"\r\n--b0und:ary  \r\nContent-Type: application/dicom\r\nContent-Length: 6\r\n\r\nsecond"
        b"\r\n--b0und:ary--\r\n"
    )
    parts = parse_multipart(body, multipart_boundary(content_type))
    assert [data for _, data in parts] == [b"first\r\n--body--", b"second"]
    assert parts[1][0]["content-length"] == "6"


def test_multipart_without_boundary_is_an_error() -> None:
    with pytest.raises(DicomError):
        multipart_boundary('multipart/related; type="application/dicom"')


# -- pixels --------------------------------------------------------------------------------------
def test_synthetic_chest_is_deterministic_and_seed_dependent() -> None:
    a = make_chest_xray(1, size=256, study_uid="1.2.3", series_uid="1.2.3.1", sop_instance_uid="1.2.3.1.1")
    b = make_chest_xray(1, size=256, study_uid="1.2.3", series_uid="1.2.3.1", sop_instance_uid="1.2.3.1.1")
    c = make_chest_xray(2, size=256)
    assert a.PixelData == b.PixelData
    assert a.PixelData != c.PixelData
    assert a.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (a.Modality, a.BodyPartExamined, a.ViewPosition, a.PhotometricInterpretation) == (
        "DX", "CHEST", "PA", "MONOCHROME2")


def test_chest_display_has_dark_lungs_and_bright_spine() -> None:
    image = to_display_array(make_chest_xray(5, size=512))
    assert image.shape == (512, 512) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    lung = image[200:280, 120:170].mean()  # right lung field (image left)
    spine = image[200:280, 250:262].mean()
    assert lung + 0.2 < spine


@pytest.mark.parametrize("windowed", [True, False])
def test_monochrome1_is_inverted_relative_to_monochrome2(windowed: bool) -> None:
    mono2 = make_chest_xray(3, size=256)
    mono1 = make_chest_xray(3, size=256, photometric="MONOCHROME1")
    np.testing.assert_array_equal(mono1.pixel_array, 4095 - mono2.pixel_array)
    if windowed:  # mirror the window so both describe the same display
        for ds in (mono1, mono2):
            ds.VOILUTFunction = "LINEAR_EXACT"
        mono1.WindowCenter = 4095 - mono2.WindowCenter
        mono1.WindowWidth = mono2.WindowWidth
    else:
        for ds in (mono1, mono2):
            del ds.WindowCenter, ds.WindowWidth
    np.testing.assert_allclose(to_display_array(mono1), to_display_array(mono2), atol=1e-5)


def test_rescale_is_applied_before_the_window() -> None:
    ds = pydicom_file("CT_small.dcm")
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, "LINEAR_EXACT"  # a soft-tissue window in HU
    hu = ds.pixel_array.astype(np.float32) - 1024
    expected = np.clip((hu - 40) / 400 + 0.5, 0, 1)
    np.testing.assert_allclose(to_display_array(ds), expected, atol=1e-6)

    ds.RescaleSlope = 2
    expected = np.clip((ds.pixel_array.astype(np.float32) * 2 - 1024 - 40) / 400 + 0.5, 0, 1)
    np.testing.assert_allclose(to_display_array(ds), expected, atol=1e-6)


def test_window_is_applied_with_the_linear_formula() -> None:
    ds = pydicom_file("MR_small.dcm")
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float32)
    expected = np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    out = to_display_array(ds)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    ds.WindowCenter, ds.WindowWidth = 1000, 200  # a narrow window saturates both ends
    narrow = to_display_array(ds)
    assert (narrow == 0).any() and (narrow == 1).any()
    np.testing.assert_allclose(window(np.array([-1e6, 1e6], np.float32), 1000, 200), [0, 1])


def test_without_a_window_percentiles_stretch_the_image() -> None:
    ds = pydicom_file("CT_small.dcm")
    assert "WindowCenter" not in ds
    out = to_display_array(ds)
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.002 < (out == 1.0).mean() < 0.05  # about 0.5 % saturates at each end


def test_voi_lut_sequence_is_applied() -> None:
    ds = make_chest_xray(4, size=128)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [4095 - v for v in range(4096)]  # an inverting LUT wins over the window
    ds.VOILUTSequence = Sequence([item])
    np.testing.assert_allclose(to_display_array(ds), 1 - ds.pixel_array / 4095.0, atol=1e-6)


def test_first_frame_of_a_multiframe_image() -> None:
    ds = pydicom_file("MR_small.dcm")
    frames = np.stack([ds.pixel_array, ds.pixel_array[::-1]])
    single = to_display_array(ds)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    np.testing.assert_array_equal(to_display_array(ds), single)


def test_rgb_becomes_luminance() -> None:
    ds = pydicom_file("SC_rgb_rle.dcm")
    out = to_display_array(ds)
    assert out.shape == (ds.Rows, ds.Columns)
    rgb = ds.pixel_array.astype(np.float32) / 255
    np.testing.assert_allclose(out, rgb @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-5)


@pytest.mark.parametrize("kind", ["sr", "pdf"])
def test_non_image_instances_are_not_images(kind: str) -> None:
    ds = make_non_image(generate_uid(), kind, patient_name="DOE^JANE")  # type: ignore[arg-type]
    with pytest.raises(NotAnImage) as caught:
        to_display_array(ds)
    assert "DOE" not in caught.value.reason


def test_image_without_pixel_data_is_not_an_image() -> None:
    ds = make_chest_xray(1, size=64)
    ds.SOPClassUID = DX_FOR_PRESENTATION
    del ds.PixelData
    with pytest.raises(NotAnImage, match="no pixel data"):
        to_display_array(ds)


def test_corrupt_pixels_are_not_an_image() -> None:
    ds = make_chest_xray(1, size=64)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(NotAnImage, match="cannot be decoded"):
        to_display_array(ds)


def test_pydicom_sr_file_is_not_an_image() -> None:
    with pytest.raises(NotAnImage):
        to_display_array(pydicom_file("test-SR.dcm"))


def test_preprocess_shape_dtype_and_normalisation() -> None:
    image = np.full((300, 300), 0.5, np.float32)
    out = preprocess(image, size=(224, 224), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 112, 112], (0.5 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-5)
    one = preprocess(image, size=(64, 32), channels=1, mean=(0.5,), std=(0.25,))
    assert one.shape == (1, 64, 32)
    np.testing.assert_allclose(one, 0.0, atol=1e-6)


def test_preprocess_keeps_the_aspect_ratio_by_padding() -> None:
    wide = np.ones((100, 200), np.float32)
    out = preprocess(wide, size=(100, 100), channels=1, mean=(0.0,), std=(1.0,))
    assert out[0, 0, 50] == pytest.approx(0.0)  # padding above the image
    assert out[0, 50, 50] == pytest.approx(1.0)
    assert out[0, 99, 50] == pytest.approx(0.0)  # and below


def test_preprocess_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4), np.float32), channels=3, mean=(0.1, 0.2), std=(1.0,))
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4, 3), np.float32))


def test_full_size_chest_through_the_whole_pipeline(dicomweb: DicomWebClient, uploaded: Uploaded) -> None:
    ref = next(r for r in dicomweb.search_instances(uploaded.chest.StudyInstanceUID) if r.probably_image)
    tensor = preprocess(to_display_array(dicomweb.retrieve_instance(ref)))
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all()


def test_make_demo_dicom_cli_writes_readable_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_demo_dicom.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--count", "2", "--size", "128", "--with-non-image", "pdf"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 4, done.stdout
    images = [dcmread(f) for f in files if "pdf" not in f.name]
    assert images[0].pixel_array.shape == (128, 128)
    assert images[0].PixelData != images[1].PixelData
