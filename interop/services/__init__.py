"""Application services: what the hub does with a study, an order, a report and a review.

Each takes a `Context` (settings and the data the hub runs on) and a connection, and runs in the
caller's transaction; the edges (HTTP, MLLP, the queue runners) own connections and transactions.
"""
