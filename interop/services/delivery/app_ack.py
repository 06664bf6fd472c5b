"""Application acknowledgements: when an HL7 v2 sender asks for one (MSH-16, enhanced mode), it
gets AA once the hub has processed its message, or AE with an ERR saying why it could not be.

MSH-16 (HL7 table 0155): AL always, ER only when not accepted, SU only when accepted, NE never.
The acknowledgement goes over MLLP to the sender's return address in the sites file (`app_ack`,
else its `hl7` destination; over TLS when that says `tls: true`), in that destination's lane, as a
message of its own (MSH-15 AL: the sender commits it with a CA). A sender the sites file does not know has no return address:
its failures are still on `/hl7/messages?status=failed`, in the `hl7_failed` view and on /metrics.
"""
from __future__ import annotations

from typing import Any

import psycopg

from ...hl7 import ack
from ...hl7.errors import AckCode, ErrorCode, Hl7Error
from ...hl7.header import read
from ...sites import Site
from ...store import hl7_messages, queue
from ...tls import ClientTls
from ..context import Context
from . import APP_ACK, Message, Outcome, lane, site_of_lane
from .hl7 import exchange

WANTED = {"AL": ("AA", "AE", "AR"), "ER": ("AE", "AR"), "SU": ("AA",), "NE": ()}


def wanted(app_ack_type: str | None, code: str) -> bool:
    """Whether MSH-16 asks for an application acknowledgement with this code."""
    return code in WANTED.get((app_ack_type or "").strip().upper(), ())


def ack_lane(site: Site) -> str | None:
    address = site.ack_address
    if address is None:
        return None
    same = site.hl7 is not None and (site.hl7.host, site.hl7.port) == (address.host, address.port)
    return lane(site.code, "hl7" if same else "ack")


def queue_app_ack(conn: psycopg.Connection[Any], ctx: Context, message: dict[str, Any], code: str,
                  reason: str | None = None, problem: Hl7Error | None = None) -> int | None:
    """Queue the application acknowledgement of a processed message, in the transaction that
    recorded the outcome (`problem`, an error of the mapping, says where in the message); None when
    MSH-16 does not ask for one or the sender has no return address."""
    if not wanted(message.get("app_ack_type"), code):
        return None
    site = ctx.sites.find(message.get("sending_facility"))
    where = ack_lane(site) if site is not None else None
    if where is None:
        return None
    policy = ctx.policies.kind(APP_ACK)
    where_in = [problem.segment, problem.sequence, problem.field, int(problem.error_code)] if problem else None
    return queue.enqueue(conn, APP_ACK, {"message": message["id"], "code": code, "reason": reason, "where": where_in},
                         dedupe_key=f"app-ack:{message['id']}", max_attempts=policy.max_attempts,
                         priority=policy.priority, lane=where, series=f"HL7Message/{message['id']}", seq=1)


class AppAckChannel:
    """`hl7-app-ack` jobs."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.tls = ClientTls.from_settings(ctx.settings)

    def _site(self, job: queue.Job) -> Site | None:
        return site_of_lane(self.ctx, job.lane)

    def prepare(self, conn: psycopg.Connection[Any], job: queue.Job) -> Message | Outcome:
        site = self._site(job)
        if site is None or site.ack_address is None:
            return Outcome.dead(f"no return address for {job.lane} in the sites file")
        if job.message and job.message_id:
            return Message(job.message_id, job.message)
        stored = hl7_messages.read(conn, int(job.payload["message"]))
        if stored is None:
            return Outcome.dead("the HL7 message is no longer stored")
        header = read(bytes(stored["raw"]))[0]
        code = AckCode(job.payload["code"])
        problem = None
        if not code.accepted:
            segment, sequence, field, error_code = job.payload.get("where") or ["MSH", 1, None, 207]
            problem = Hl7Error(str(job.payload.get("reason") or "the message could not be processed"), segment,
                               field, sequence)
            problem.ack_code = code
            problem.error_code = ErrorCode(error_code) if error_code in ErrorCode._value2member_map_ \
                else ErrorCode.APPLICATION_INTERNAL_ERROR
        control_id = ack.new_control_id()
        text = ack.build(header, code, problem, control_id=control_id, application=True)
        return Message(control_id, text.decode("utf-8", "replace"))

    def send(self, job: queue.Job, message: Message) -> Outcome:
        site = self._site(job)
        address = site.ack_address if site is not None else None
        if site is None or address is None:
            return Outcome.dead(f"no return address for {job.lane} in the sites file")
        connect, answer = (site.hl7.connect_timeout_seconds, site.hl7.ack_timeout_seconds) if site.hl7 else (10.0, 30.0)
        return exchange(address.host, address.port, connect, answer, message, tls=self.tls if address.tls else None)

    def ended(self, conn: psycopg.Connection[Any], job: queue.Job, outcome: Outcome, status: str) -> None:
        pass
