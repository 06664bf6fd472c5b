"""Compressed pixel data, CT/MR volume assembly, mammography views, and the series path through a real Orthanc."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from interop.dicom import IncompleteSeries, NoSuitableSeries, NotAnImage, NoViews
from interop.dicom.dicomweb import DicomWebClient, InstanceRef, iter_multipart, parse_multipart
from interop.dicom.pixels import decode_frame, to_display_array
from interop.dicom.views import STANDARD_VIEWS, ViewSlot, ViewSpec, assemble_views, select_views, view_of_dataset
from interop.dicom.volume import (
    BRAIN_CT_RULES,
    BRAIN_CT_WINDOWS,
    SeriesFacts,
    SeriesRules,
    VolumeSpec,
    build_volume,
    choose_series,
    facts_from_dataset,
    series_facts,
)
from scripts.peers.orthanc import Orthanc
from scripts.synthetic.dicom import (
    MG_FOR_PRESENTATION,
    compress,
    dataset_bytes,
    iter_ct_head_series,
    make_chest_xray,
    make_ct_head_series,
    make_mammogram,
    make_mammography_exam,
    make_mr_brain_series,
    make_spine_xray,
)

ROOT = Path(__file__).resolve().parent.parent
LOSSLESS = [uid.RLELossless, uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEG2000Lossless]
# (syntax, largest and mean absolute error in 12-bit stored values): NEAR=2 for JPEG-LS is exact.
LOSSY = [(uid.JPEGLSNearLossless, 2, 1.5), (uid.JPEG2000, 200, 30), (uid.JPEGBaseline8Bit, 200, 30)]


def pydicom_file(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)  # shipped with pydicom; never downloaded
    assert path is not None, f"pydicom test file {name} is not installed"
    return dcmread(path)


@pytest.fixture(scope="module")
def spine() -> Dataset:
    return make_spine_xray(3)  # 2560 x 2048, 12-bit


# -- compressed transfer syntaxes -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicom_lossless_files_decode_to_the_uncompressed_pixels(name: str) -> None:
    reference = pydicom_file("MR_small.dcm")
    ds = pydicom_file(name)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(decode_frame(ds), reference.pixel_array)
    np.testing.assert_array_equal(to_display_array(ds), to_display_array(reference))


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_16.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "SC_rgb_jpeg_gdcm.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", "J2K_pixelrep_mismatch.dcm",
                                  "SC_rgb_rle_16bit_2frame.dcm", "examples_jpeg2k.dcm"])
def test_pydicom_compressed_files_decode(name: str) -> None:
    ds = pydicom_file(name)
    image = to_display_array(ds)
    assert image.shape == (ds.Rows, ds.Columns) and image.dtype == np.float32
    assert np.isfinite(image).all() and image.max() > image.min()


def test_jpeg_extended_12_bit_needs_the_optional_gpl_decoder() -> None:
    """12-bit lossy JPEG decodes only with the `jpeg12` extra (pylibjpeg-libjpeg, GPL-3.0)."""
    ds = pydicom_file("JPEG-lossy.dcm")
    try:
        import libjpeg  # noqa: F401
    except ImportError:
        with pytest.raises(NotAnImage, match=r"cannot be decoded \(JPEG Extended"):
            to_display_array(ds)
    else:
        assert to_display_array(ds).shape == (1024, 256)


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_full_size_lossless_round_trip_is_exact(spine: Dataset, syntax: str) -> None:
    packed = compress(spine, syntax)
    assert packed.file_meta.TransferSyntaxUID == syntax
    assert len(packed.PixelData) < len(spine.PixelData)
    np.testing.assert_array_equal(decode_frame(packed), spine.pixel_array)
    np.testing.assert_array_equal(to_display_array(packed), to_display_array(spine))


@pytest.mark.parametrize("syntax, max_error, mean_error", LOSSY, ids=lambda v: getattr(v, "name", ""))
def test_full_size_lossy_round_trip_is_close(spine: Dataset, syntax: str, max_error: float, mean_error: float) -> None:
    packed = compress(spine, syntax)
    assert packed.LossyImageCompression == "01"
    decoded = decode_frame(packed).astype(np.float32)
    if packed.BitsStored == 8:  # JPEG baseline: stored as the top 8 of the 12 bits
        decoded = decoded * 16 + 8
    error = np.abs(decoded - spine.pixel_array.astype(np.float32))
    assert error.max() <= max_error and error.mean() <= mean_error, (error.max(), error.mean())


def test_compressed_multiframe_decodes_frame_by_frame() -> None:
    slices = make_ct_head_series(5, slices=3, size=128)
    expected = [s.pixel_array.copy() for s in slices]
    ds = slices[0]
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(s.PixelData for s in slices)
    packed = compress(ds, uid.RLELossless)
    for i, frame in enumerate(expected):
        np.testing.assert_array_equal(decode_frame(packed, i), frame)
    with pytest.raises(NotAnImage, match="out of range"):
        decode_frame(packed, 3)


def _truncated(ds: Dataset) -> Dataset:
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    return ds


def _garbled_header(ds: Dataset) -> Dataset:
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[2:66] = bytes(random.Random(1).randrange(256) for _ in range(64))
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


@pytest.mark.parametrize("syntax", LOSSLESS + [uid.JPEGBaseline8Bit], ids=lambda s: s.name)
@pytest.mark.parametrize("damage", [_truncated, _garbled_header], ids=["truncated", "garbled"])
def test_corrupt_compressed_pixels_are_not_an_image(syntax: str, damage: object) -> None:
    ds = damage(compress(make_spine_xray(4, rows=512, cols=384), syntax))  # type: ignore[operator]
    ds.PatientName = "DOE^JANE"
    with pytest.raises(NotAnImage) as caught:
        to_display_array(ds)
    assert "cannot be decoded" in caught.value.reason and "DOE" not in caught.value.reason


# -- series choice -----------------------------------------------------------------------------------
def _facts(**kw: object) -> SeriesFacts:
    base = dict(study_uid="1.2", series_uid=generate_uid(), modality="CT", series_description="HEAD",
                convolution_kernel="H30s", slice_thickness=5.0, image_orientation=(1, 0, 0, 0, 1, 0),
                instances=32, frames=32)
    base.update(kw)
    return SeriesFacts(**base)  # type: ignore[arg-type]


def test_choice_prefers_the_axial_brain_kernel_series() -> None:
    scout = _facts(series_description="Topogram 0.6 T20s", image_orientation=(1, 0, 0, 0, 0, -1), instances=2, frames=2,
                   image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    bone = _facts(series_description="HEAD 1.0 H70h", convolution_kernel="H70h", slice_thickness=1.0, instances=150,
                  frames=150)
    coronal = _facts(series_description="HEAD COR 3.0", image_orientation=(1, 0, 0, 0, 0, -1), frames=60, instances=60)
    brain = _facts(series_description="HEAD 5.0 H30s")
    mr = _facts(modality="MR", convolution_kernel=None)
    assert choose_series([scout, bone, coronal, mr, brain], BRAIN_CT_RULES) is brain
    # also when the brain series is the thin one and the kernel is written another way
    thin = _facts(series_description="Brain 1.25", convolution_kernel="STANDARD", slice_thickness=1.25, frames=120)
    assert choose_series([bone, thin, scout], BRAIN_CT_RULES) is thin


def test_choice_without_orientation_still_works_and_reason_is_safe() -> None:
    unknown = _facts(image_orientation=None)
    assert choose_series([unknown], BRAIN_CT_RULES) is unknown
    strict = SeriesRules.from_mapping({"modalities": ["CT"], "require_orientation": True, "min_slices": 10})
    with pytest.raises(NoSuitableSeries) as caught:
        choose_series([unknown, _facts(frames=3, instances=3)], strict)
    assert caught.value.reason == "no series fits the model's rules (1 with too few slices, 1 without known orientation)"
    with pytest.raises(NoSuitableSeries):
        choose_series([], BRAIN_CT_RULES)
    with pytest.raises(ValueError):
        SeriesRules.from_mapping({"kernel": "H30s"})


def test_series_facts_from_search_results_and_headers() -> None:
    study = generate_uid()
    series = make_ct_head_series(1, slices=3, size=64, study_uid=study)
    refs = [InstanceRef(study, ds.SeriesInstanceUID, ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, modality="CT",
                        rows=64, columns=64, convolution_kernel="H30s", slice_thickness=5.0,
                        series_description="HEAD 5.0 H30s") for ds in series]
    facts = series_facts(refs + [InstanceRef(study, "9.9", "9.9.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11")])
    by_uid = {f.series_uid: f for f in facts}
    assert by_uid[series[0].SeriesInstanceUID].frames == 3 and by_uid["9.9"].frames == 0
    header = facts_from_dataset(series[0], instances=3)
    assert (header.plane, header.convolution_kernel, header.slice_thickness, header.frames) == ("axial", "H30s", 5.0, 3)


# -- volumes ----------------------------------------------------------------------------------------
def test_shuffled_slices_are_sorted_by_position() -> None:
    series = make_ct_head_series(2, slices=20, size=128)
    ordered = build_volume(series, VolumeSpec(depth=20, height=128, width=128, normalise="none"))
    shuffled = list(series)
    random.Random(3).shuffle(shuffled)
    for ds in shuffled:  # InstanceNumber must not be what sorts them
        ds.InstanceNumber = random.Random(ds.SOPInstanceUID).randrange(1000)
    again = build_volume(iter(shuffled), VolumeSpec(depth=20, height=128, width=128, normalise="none"))
    np.testing.assert_array_equal(again, ordered)
    assert ordered.shape == (1, 20, 128, 128)
    hu = [ds.pixel_array.astype(np.float32) - 1024 for ds in series]
    np.testing.assert_allclose(ordered[0, 7], hu[7], atol=1e-4)  # same size and depth: exactly the HU


@pytest.mark.parametrize("missing, count", [([6], 1), ([3, 4], 2), ([10, 15], 2)])
def test_missing_slices_are_an_incomplete_series(missing: list[int], count: int) -> None:
    series = make_ct_head_series(1, slices=24, size=64, missing=missing, patient_id="SECRET-ID")
    with pytest.raises(IncompleteSeries) as caught:
        build_volume(series, VolumeSpec())
    assert caught.value.reason.startswith(f"{count} slice(s) missing")
    assert "SECRET" not in caught.value.reason and not caught.value.is_transient


def test_duplicate_and_mixed_slices_are_refused() -> None:
    series = make_ct_head_series(1, slices=10, size=64)
    with pytest.raises(IncompleteSeries, match="duplicated"):
        build_volume(series + [series[4]], VolumeSpec())
    other = make_ct_head_series(1, slices=2, size=64, series_uid=series[0].SeriesInstanceUID, orientation="coronal")
    with pytest.raises(IncompleteSeries, match="orientations"):
        build_volume(series + other, VolumeSpec())
    with pytest.raises(IncompleteSeries, match="more than one series"):
        build_volume(series + make_ct_head_series(1, slices=2, size=64), VolumeSpec())
    with pytest.raises(NotAnImage):
        build_volume([], VolumeSpec())


def test_windows_give_the_expected_channel_values_on_known_hu() -> None:
    series = make_ct_head_series(1, slices=4, size=64)
    values = np.array([-1000, 0, 5, 35, 40, 70, 80, 180, 1000], dtype=np.float32)
    for ds in series:
        plane = np.full((64, 64), -1000.0, np.float32)
        plane[0, : len(values)] = values
        ds.PixelData = (plane + 1024).astype(np.uint16).tobytes()
    out = build_volume(series, VolumeSpec(depth=4, height=64, width=64, windows=BRAIN_CT_WINDOWS))
    assert out.shape == (2, 4, 64, 64) and out.dtype == np.float32
    brain = np.clip((values - 0) / 80, 0, 1)  # centre 40, width 80: 0..80 HU
    subdural = np.clip((values + 20) / 200, 0, 1)  # centre 80, width 200: -20..180 HU
    np.testing.assert_allclose(out[0, 2, 0, : len(values)], brain, atol=1e-6)
    np.testing.assert_allclose(out[1, 2, 0, : len(values)], subdural, atol=1e-6)


def test_haemorrhage_is_brighter_than_brain_in_the_brain_window() -> None:
    spec = VolumeSpec(depth=16, height=128, width=128, windows=((40, 80),))
    vol = build_volume(iter_ct_head_series(4, slices=16, size=256, haemorrhage=True), spec)
    mid = vol[0, 8]
    blob = mid[64 - 5 : 64 - 1, 64 + 14 : 64 + 18].mean()  # x +30 mm, y +10 mm on a 250 mm field
    brain = mid[64 - 2 : 64 + 2, 64 - 30 : 64 - 26].mean()
    assert 0.75 < blob and 0.35 < brain < 0.55


def test_depth_and_in_plane_resampling() -> None:
    series = make_ct_head_series(1, slices=9, size=128, thickness=2.0)
    lin = build_volume(series, VolumeSpec(depth=17, height=64, width=64, normalise="none"))
    near = build_volume(series, VolumeSpec(depth=17, height=64, width=64, normalise="none", interpolation="nearest"))
    assert lin.shape == near.shape == (1, 17, 64, 64)
    np.testing.assert_allclose(lin[0, 1], (lin[0, 0] + lin[0, 2]) / 2, atol=1e-3)  # halfway between two slices
    np.testing.assert_array_equal(near[0, 2], near[0, 2])
    assert set(np.unique(near)).issubset(set(np.unique(build_volume(series, VolumeSpec(
        depth=9, height=64, width=64, normalise="none", interpolation="nearest")))))


def test_mr_is_z_scored_and_rectangular_slices_keep_their_aspect() -> None:
    series = make_mr_brain_series(2, slices=12, size=96)
    for ds in series:
        ds.PixelData = ds.pixel_array[:, 8:-8].copy().tobytes()
        ds.Columns = 80
    vol = build_volume(series, VolumeSpec(depth=12, height=64, width=64, normalise="zscore"))
    foreground = vol[vol > vol.min()]
    assert abs(float(foreground.mean())) < 1e-3 and abs(float(foreground.std()) - 1) < 1e-2


def test_enhanced_multiframe_volume_matches_single_frames() -> None:
    from pydicom.sequence import Sequence

    series = make_ct_head_series(6, slices=6, size=64)
    expected = build_volume(series, VolumeSpec(depth=6, height=64, width=64, normalise="none"))
    ds = series[0]
    ds.NumberOfFrames = 6
    order = [3, 0, 5, 1, 4, 2]  # frames stored out of order
    ds.PixelData = b"".join(series[i].PixelData for i in order)
    groups = []
    for i in order:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = series[i].ImagePositionPatient
        item.PlanePositionSequence = Sequence([position])
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    del ds.ImagePositionPatient
    np.testing.assert_array_equal(build_volume([ds], VolumeSpec(depth=6, height=64, width=64, normalise="none")),
                                  expected)


def test_volume_memory_stays_below_one_copy_of_the_series() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "volume_memory.py"), "--child", "stream",
                           "--slices", "120", "--size", "512"], capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["peak_above_baseline_mib"] < figures["raw_series_mib"], figures


# -- mammography views ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exam() -> list[Dataset]:
    return make_mammography_exam(3)  # full-field 3328 x 2560


def test_mammogram_tags(exam: list[Dataset]) -> None:
    ds = exam[0]
    assert (ds.SOPClassUID, ds.Modality, ds.BodyPartExamined, ds.PresentationIntentType) == (
        MG_FOR_PRESENTATION, "MG", "BREAST", "FOR PRESENTATION")
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.PhotometricInterpretation) == (3328, 2560, 12, "MONOCHROME2")
    assert [view_of_dataset(d) for d in exam] == list(STANDARD_VIEWS)
    assert len({d.StudyInstanceUID for d in exam}) == 1


def test_four_views_in_spec_order_with_the_chest_wall_on_one_side(exam: list[Dataset]) -> None:
    spec = ViewSpec(height=512, width=416)
    views = assemble_views(reversed(exam), spec)
    assert views.pixels.shape == (4, 1, 512, 416) and views.pixels.dtype == np.float32
    np.testing.assert_array_equal(views.present, [1, 1, 1, 1])
    assert views.instance_uids == tuple(d.SOPInstanceUID for d in exam)
    assert views.flipped == (True, False, True, False)  # right breasts turned
    for plane in views.pixels[:, 0]:
        assert plane[:, :20].mean() > 0.4 > plane[:, -20:].mean()  # tissue at the chest wall, air at the nipple side
    right = assemble_views(exam, ViewSpec(height=512, width=416, chest_wall="right"))
    assert right.flipped == (False, True, False, True)
    np.testing.assert_allclose(right.pixels[0, 0, :, ::-1], views.pixels[0, 0], atol=1e-6)


def test_missing_view_is_zeros_and_not_present(exam: list[Dataset]) -> None:
    spec = ViewSpec(height=256, width=208, mean=0.5, std=0.25)
    views = assemble_views([exam[0], exam[1], exam[3]], spec)
    np.testing.assert_array_equal(views.present, [1, 1, 0, 1])
    assert not views.pixels[2].any() and views.instance_uids[2] is None
    with pytest.raises(NoViews):
        assemble_views([make_chest_xray(1, size=64)], spec)


def test_view_code_sequence_and_orientation_fallbacks() -> None:
    ds = make_mammogram(9, "R", "MLO", rows=416, cols=320, with_view_position=False)
    assert view_of_dataset(ds) == ViewSlot("R", "MLO")
    del ds.PatientOrientation  # the tissue at the edge tells where the chest wall is
    views = assemble_views([ds], ViewSpec(views=(ViewSlot("R", "MLO"),), height=208, width=160))
    assert views.flipped == (True,)
    del ds.ImageLaterality  # the series' Laterality is enough
    assert view_of_dataset(ds) == ViewSlot("R", "MLO")
    spec = ViewSpec.from_mapping({"views": [{"laterality": "l", "view": "cc"}], "height": 64, "width": 52})
    assert spec.views == (ViewSlot("L", "CC"),)


def test_corrupt_view_is_counted_and_left_out(exam: list[Dataset]) -> None:
    bad = compress(make_mammogram(4, "L", "CC", rows=416, cols=320), uid.RLELossless)
    bad.PixelData = bad.PixelData[:200]
    views = assemble_views([bad, make_mammogram(4, "R", "CC", rows=416, cols=320)], ViewSpec(height=64, width=52))
    assert views.undecodable == 1
    np.testing.assert_array_equal(views.present, [1, 0, 0, 0])


# -- streaming multipart (pure) ---------------------------------------------------------------------
def test_streaming_multipart_matches_the_whole_body_parser_for_any_chunking() -> None:
    body = (b"pre\r\n--xyz\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--xy--"
            b"\r\n--xyz\r\nContent-Type: application/dicom\r\nContent-Length: 6\r\n\r\nsecond"
            b"\r\n--xyz\r\n\r\nthird\r\n--xyz--\r\n")
    expected = parse_multipart(body, b"xyz")
    for size in (1, 2, 3, 7, 64):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert list(iter_multipart(chunks, b"xyz")) == expected
    with pytest.raises(Exception, match="truncated"):
        list(iter_multipart([body[:60]], b"xyz"))


# -- against a real Orthanc ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored(orthanc: Orthanc) -> dict[str, list[Dataset]]:
    study = generate_uid()
    common = dict(study_uid=study, accession="ACC-CT-HEAD", patient_id="TEST-CT")
    brain = make_ct_head_series(8, slices=40, thickness=5.0, **common)  # type: ignore[arg-type]
    bone = make_ct_head_series(8, slices=40, thickness=5.0, kernel="H70h", description="HEAD 5.0 H70h bone",
                               series_number=3, **common)  # type: ignore[arg-type]
    scout = make_ct_head_series(8, slices=1, size=512, orientation="coronal", description="Topogram 0.6 T20s",
                                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1, **common)  # type: ignore[arg-type]
    brain[5] = compress(brain[5], uid.JPEG2000Lossless)  # a PACS mixes syntaxes in one series
    brain[6] = compress(brain[6], uid.RLELossless)
    mammo = make_mammography_exam(5, accession="ACC-MG", patient_id="TEST-MG")
    result = {"brain": brain, "bone": bone, "scout": scout, "mammo": mammo}
    for group in result.values():
        for ds in group:
            assert orthanc.upload(dataset_bytes(ds))["Status"] == "Success"
    return result


def test_search_returns_the_new_fields(orthanc: Orthanc, stored: dict[str, list[Dataset]]) -> None:
    with DicomWebClient(orthanc.dicomweb_url, timeout_s=30) as client:
        refs = client.search_instances(stored["brain"][0].StudyInstanceUID)
        mg_refs = client.search_instances(stored["mammo"][0].StudyInstanceUID)
    brain_uid = stored["brain"][0].SeriesInstanceUID
    ref = next(r for r in refs if r.series_uid == brain_uid)
    assert (ref.convolution_kernel, ref.slice_thickness, ref.series_number) == ("H30s", 5.0, 2)
    assert ref.number_of_series_related_instances in (None, 40)
    assert ref.image_orientation in (None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    facts = series_facts(refs)
    assert choose_series(facts, BRAIN_CT_RULES).series_uid == brain_uid
    by_uid = {r.instance_uid: r for r in mg_refs}
    for ds in stored["mammo"]:
        r = by_uid[ds.SOPInstanceUID]
        assert (r.image_laterality, r.view_position, r.breast_laterality) == (ds.ImageLaterality, ds.ViewPosition,
                                                                              ds.ImageLaterality)
    chosen = select_views(mg_refs, ViewSpec())
    assert [chosen[slot].instance_uid for slot in STANDARD_VIEWS] == [d.SOPInstanceUID for d in stored["mammo"]]


def test_retrieve_series_streams_every_slice_once_into_a_volume(orthanc: Orthanc, stored: dict[str, list[Dataset]]) -> None:
    brain = stored["brain"]
    with DicomWebClient(orthanc.dicomweb_url, timeout_s=30) as client:
        seen = [ds.SOPInstanceUID for ds in client.retrieve_series(brain[0].StudyInstanceUID, brain[0].SeriesInstanceUID)]
        assert sorted(seen) == sorted(ds.SOPInstanceUID for ds in brain)
        volume = build_volume(client.retrieve_series(brain[0].StudyInstanceUID, brain[0].SeriesInstanceUID),
                              VolumeSpec(depth=40, height=512, width=512, normalise="none"))
        with pytest.raises(Exception) as caught:
            next(iter(client.retrieve_series(brain[0].StudyInstanceUID, generate_uid())))
        assert type(caught.value).__name__ == "StudyNotFound"
    expected = build_volume(brain, VolumeSpec(depth=40, height=512, width=512, normalise="none"))
    np.testing.assert_array_equal(volume, expected)


def test_mammography_exam_through_the_pacs(orthanc: Orthanc, stored: dict[str, list[Dataset]]) -> None:
    with DicomWebClient(orthanc.dicomweb_url, timeout_s=30) as client:
        refs = client.search_instances(stored["mammo"][0].StudyInstanceUID)
        chosen = select_views(refs, ViewSpec())
        views = assemble_views((client.retrieve_instance(r) for r in chosen.values()), ViewSpec(height=256, width=208))
    np.testing.assert_array_equal(views.present, [1, 1, 1, 1])


# -- the CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, count", [("mammo", 4), ("ct", 6), ("mr", 6), ("spine", 1)])
def test_make_demo_dicom_writes_each_family(tmp_path: Path, family: str, count: int) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_dicom.py"), str(tmp_path), "--family", family,
                    "--size", "128", "--slices", "6", "--compress", "rle"],
                   capture_output=True, text=True, timeout=120, check=True)
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == count
    ds = dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == uid.RLELossless
    assert to_display_array(ds).shape == (ds.Rows, ds.Columns)
