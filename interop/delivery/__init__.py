"""Results going out: the PostgreSQL outbox, the MLLP client and the ORU^R01 sender.

`outbox` (queue of (channel, destination, report version) rows, claimed under a lease),
`mllp_client` (one framed message out, one ACK back, with timeouts), `sender` (claim, render
the ORU^R01 with `interop.hl7.oru`, send, record the answer).
"""
