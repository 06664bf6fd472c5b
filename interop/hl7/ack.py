"""Acknowledgements (ACK) built by string formatting, in the sender's delimiters. Pure.

Original mode (MSH-15 empty): AA, AE or AR. Enhanced mode (MSH-15 present): a commit
acknowledgement CA, CE or CR, sent or not as MSH-15 asks (HL7 table 0155):
  AL always, NE never, ER only when not accepted, SU only when accepted.
The ACK text is ASCII (our own texts), so it reads the same in every charset the sender may
have declared; MSH-18 is echoed.
"""
from __future__ import annotations

import itertools
import os
import time

from . import charset
from .errors import AckCode, Hl7Error, escape
from .header import DEFAULT_ENCODING, VERSION, Header

HUB_APPLICATION = "INTEROP"
HUB_FACILITY = "HUB"
DEFAULT_VERSION = "2.5.1"

_counter = itertools.count(1)
_PREFIX = f"{os.getpid() % 1000:03d}"


def new_control_id() -> str:
    """A + yymmddHHMMSS + pid (3 digits) + counter (4 digits): 20 characters, MSH-10's v2.5 length."""
    return f"A{time.strftime('%y%m%d%H%M%S')}{_PREFIX}{next(_counter) % 10000:04d}"


def enhanced(header: Header | None) -> bool:
    return bool(header is not None and header.accept_ack_type)


def answer_code(header: Header | None, problem: Hl7Error | None) -> AckCode:
    """The code for this message: original mode AA/AE/AR, enhanced mode CA/CE/CR."""
    code = AckCode.AA if problem is None else problem.ack_code
    return code.commit if enhanced(header) else code


def should_send(header: Header | None, code: AckCode) -> bool:
    """Whether an ACK goes back at all (enhanced mode, MSH-15, table 0155)."""
    if not enhanced(header):
        return True
    assert header is not None
    rule = header.accept_ack_type
    if rule == "NE":
        return False
    if rule == "ER":
        return not code.accepted
    if rule == "SU":
        return code.accepted
    return True  # AL, and values we do not know: answering is the safe side


def build(header: Header | None, code: AckCode, problem: Hl7Error | None = None, text: str = "",
          control_id: str | None = None, timestamp: str | None = None, *, application: bool = False) -> bytes:
    """The ACK message (segments separated by CR, no MLLP frame). `application`: an application
    acknowledgement sent later, as a message of its own (MSH-15 AL: the sender commits it with a
    CA, which is how the hub knows it arrived; MSH-16 NE)."""
    if header is not None:
        sep, enc = header.field_sep, header.encoding_chars
        version = header.version if VERSION.fullmatch(header.version) else DEFAULT_VERSION
        processing = header.processing_id or "P"
        trigger = header.trigger
        fields_to = (header.sending_application, header.sending_facility)
        fields_from = (header.receiving_application or HUB_APPLICATION, header.receiving_facility or HUB_FACILITY)
        original_id = header.control_id
        charset_label = header.charset if header.charset in charset.CODECS else ""
    else:
        sep, enc, version, processing, trigger = "|", DEFAULT_ENCODING, DEFAULT_VERSION, "P", ""
        fields_to, fields_from, original_id, charset_label = ("", ""), (HUB_APPLICATION, HUB_FACILITY), "", ""
    comp = enc[0]
    sub = enc[3] if len(enc) > 3 else "&"
    msg_type = comp.join(["ACK", trigger, "ACK"])
    stamp = timestamp or time.strftime("%Y%m%d%H%M%S")
    msh = [
        "MSH", enc, fields_from[0], fields_from[1], fields_to[0], fields_to[1], stamp, "", msg_type,
        control_id or new_control_id(), processing, version,
    ]
    if application or charset_label:
        msh += ["", "", "AL" if application else "", "NE" if application else "", "", charset_label]
    while msh[-1] == "":
        msh.pop()
    if problem is not None and not text:
        text = problem.message
    msa = sep.join(["MSA", code.value, original_id, escape(text, sep, comp, sub, enc[1], enc[2])[:80]])
    segments = [sep.join(msh), msa]
    if problem is not None:
        segments.append(problem.err_segment(version, sep, comp, sub))
    codec = charset.CODECS.get(header.charset if header is not None else "", "ascii")
    if codec == "ascii":
        codec = "utf-8"  # what an ASCII-labelled sender with non-ASCII names sends in practice
    return ("\r".join(segments) + "\r").encode(codec, "replace")
