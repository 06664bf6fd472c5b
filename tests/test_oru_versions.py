"""ORU^R01 in the HL7 version each site asks for (issue 15): 2.3.1, 2.5.1 (default) or 2.6, set by
`hl7.version` in the sites file. MSH-12 says the version and every segment has only the fields
that version defines (hl7apy's strict validation for that version, segment by segment, and
python-hl7 reading the fields); end to end, a site's RIS (python-hl7's MLLP server) receives its
version from the hub's delivery runner."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import hl7
import psycopg
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Segment as ApySegment
from hl7apy.parser import parse_message, parse_segment

from interop.hl7 import oru
from interop.sites import SitesError, load
from tests.helpers import context
from tests.test_oru import MODEL, Peer, build, built_report, peer, queue  # noqa: F401  (peer: the fixture)

OBX_FIELDS = {"2.3.1": 17, "2.5.1": 25, "2.6": 25}  # HL7 v2.3.1 / v2.5.1 / v2.6 ch. 7, OBX


def _fields(segment: str) -> list[str]:
    return segment.split("|")


def strictly_valid(text: str, version: str) -> None:
    """Every segment parses under hl7apy's STRICT validation for `version` (an unknown field, a
    wrong data type or a component too many is an error there). hl7apy caps OBX-5 at 199
    characters where the standard allows 65536, so the FT impression is checked with a short text."""
    for segment in text.split("\r"):
        fields = _fields(segment)
        if fields[0] == "OBX" and fields[2] == "FT":
            fields[5] = "impression"
        parse_segment("|".join(fields), version=version, validation_level=VALIDATION_LEVEL.STRICT)
    message = parse_message(text, find_groups=True, validation_level=VALIDATION_LEVEL.TOLERANT)
    assert message.name == "ORU_R01" and message.version == version


@pytest.mark.parametrize("version", oru.VERSIONS)
def test_each_version_has_its_own_header_and_segment_shapes(version: str) -> None:
    built = built_report()
    text = build(built, version=version)
    strictly_valid(text, version)
    msg = hl7.parse(text)  # python-hl7: an independent reader
    assert str(msg.segment("MSH")[12]) == version and str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    obx = [s for s in text.split("\r") if s.startswith("OBX|")]
    assert len(obx) == len(MODEL.labels) + 2
    assert all(len(_fields(s)) - 1 <= OBX_FIELDS[version] for s in obx)
    model = f"{MODEL.name}@{MODEL.version}"
    finding = _fields(obx[1])
    if version == "2.3.1":  # no OBX-18: the model is OBX-17's alternate identifier
        assert len(finding) - 1 == 17
        assert finding[17].split("^") == ["AI", "Artificial intelligence inference", "99INTEROP",
                                          model, f"{MODEL.name} {MODEL.version}", "99INTEROP"]
    else:
        assert finding[17] == "AI^Artificial intelligence inference^99INTEROP"
        assert finding[18].split("^")[0] == model
    # what does not depend on the version stays the same
    assert [s.split("|")[:12] for s in text.split("\r")[1:]] == [
        s.split("|")[:12] for s in build(built).split("\r")[1:]]


def test_v231_is_rejected_by_hl7apy_with_an_obx_18() -> None:
    """The check above can fail: the v2.5.1 shape (with OBX-18) is not v2.3.1."""
    text = build(built_report()).replace("|P|2.5.1|", "|P|2.3.1|", 1)
    with pytest.raises(Exception, match="unknown Element"):
        strictly_valid(text, "2.3.1")
    assert len(ApySegment("OBX", version="2.3.1").structure_by_name) == 17


def test_a_version_the_hub_does_not_write_is_refused() -> None:
    with pytest.raises(oru.OruError, match="2.4"):
        build(built_report(), version="2.4")


# -- the sites file ----------------------------------------------------------------------------------
def _sites(tmp_path: Path, hl7_block: str) -> Path:
    path = tmp_path / "sites.yaml"
    path.write_text(f"sites:\n  BVDKDN:\n    name: BV\n    hl7: {hl7_block}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("written,version", [
    ("{host: h, port: 1}", "2.5.1"), ('{host: h, port: 1, version: "2.3.1"}', "2.3.1"),
    ("{host: h, port: 1, version: 2.3.1}", "2.3.1"), ("{host: h, port: 1, version: 2.6}", "2.6"),
])
def test_sites_file_hl7_version(tmp_path: Path, written: str, version: str) -> None:
    site = load(_sites(tmp_path, written))["BVDKDN"]
    assert site.hl7 is not None and site.hl7.version == version


@pytest.mark.parametrize("written", ['{host: h, port: 1, version: "2.4"}', "{host: h, port: 1, version: 2.5}",
                                    '{host: h, port: 1, version: ""}'])
def test_sites_file_refuses_a_version_the_hub_does_not_write(tmp_path: Path, written: str) -> None:
    with pytest.raises(SitesError, match="hl7.version must be one of 2.3.1, 2.5.1, 2.6"):
        load(_sites(tmp_path, written))


def test_the_shipped_sites_file_documents_the_key() -> None:
    text = Path("mappings/sites.yaml").read_text(encoding="utf-8")
    assert 'version: "2.5.1"' in text and "2.3.1" in text


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.3.1", "2.6"])
def test_the_ris_receives_the_version_its_site_asks_for(stored: psycopg.Connection[Any], peer: Peer,  # noqa: F811
                                                        db_url: str, tmp_path: Path, version: str) -> None:
    from interop.workers.delivery import Deliverer

    sites = tmp_path / "sites.yaml"
    sites.write_text("sites:\n  BVDKDN:\n    name: Benh vien Da khoa Dong Nai\n"
                     f"    hl7: {{host: 127.0.0.1, port: {peer.port}, receiving_application: RIS,"
                     f" version: \"{version}\", ack_timeout_seconds: 5}}\n", encoding="utf-8")
    sender = Deliverer(context(INTEROP_SITES=str(sites), DATABASE_URL=db_url, TRITON_URL="unused:1"),
                       worker_id="test-sender")
    try:
        [_item] = queue(stored, sender)
        assert sender.run_once() is True
    finally:
        sender.close()
    (received,) = peer.received
    text = received.replace("\n", "\r").strip("\r")
    assert str(hl7.parse(text).segment("MSH")[12]) == version
    strictly_valid(text, version)
    obx = [s for s in text.split("\r") if s.startswith("OBX|")]
    assert obx and all(len(_fields(s)) - 1 <= OBX_FIELDS[version] for s in obx)
