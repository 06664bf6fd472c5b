"""The job queue on a real PostgreSQL: SKIP LOCKED claims, leases, back-off, lease loss."""
from __future__ import annotations

import threading
import time

import pytest

from interop.store import queue as jobs
from interop.store.db import connect, migrate


def test_migrations_are_idempotent(db_url: str) -> None:
    assert migrate(db_url) == []  # the template was migrated already


def test_each_job_is_claimed_by_one_worker(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        with conn.transaction():
            for i in range(20):
                jobs.enqueue(conn, "k", {"i": i}, dedupe_key=f"k{i}")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        with connect(db_url, autocommit=True) as conn:
            while (job := jobs.claim(conn, name, 60)) is not None:
                with lock:
                    claimed.append(job.payload["i"])
                with conn.transaction():
                    jobs.complete(conn, job, {"total": 0.0})

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(20))


def test_dedupe_key_queues_once(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        assert jobs.enqueue(conn, "k", {}, dedupe_key="same") is not None
        assert jobs.enqueue(conn, "k", {}, dedupe_key="same") is None
        assert jobs.depth(conn) == {"queued": 1}


def test_expired_lease_is_taken_over_and_the_old_holder_cannot_finish(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        jobs.enqueue(conn, "k", {}, dedupe_key="x")
        slow = jobs.claim(conn, "slow", 1)
        assert slow is not None and jobs.claim(conn, "other", 1) is None
        time.sleep(1.2)
        fast = jobs.claim(conn, "fast", 60)
        assert fast is not None and fast.id == slow.id and fast.attempts == 2
        with pytest.raises(jobs.LeaseLost):
            with conn.transaction():
                jobs.complete(conn, slow, {})
        with pytest.raises(jobs.LeaseLost):
            jobs.renew(conn, slow, 60)
        with conn.transaction():
            jobs.complete(conn, fast, {"total": 1.0})
        assert jobs.depth(conn) == {"done": 1}


def test_retry_backs_off(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        jobs.enqueue(conn, "k", {}, dedupe_key="r")
        job = jobs.claim(conn, "w", 60)
        assert job is not None
        with conn.transaction():
            assert jobs.retry_later(conn, job, "PacsUnavailable", jobs.backoff_seconds(job.attempts, 30)) == 30
        assert jobs.claim(conn, "w", 60) is None  # not due yet
        row = conn.execute("SELECT status, last_error, run_after > now() + interval '25 seconds' AS later FROM job").fetchone()
        assert row == {"status": "queued", "last_error": "PacsUnavailable", "later": True}
    assert [jobs.backoff_seconds(n, 5) for n in (1, 2, 3, 10)] == [5, 10, 20, 600]


def test_cancel_withdraws_a_queued_job(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        jobs.enqueue(conn, "k", {}, dedupe_key="c")
        assert jobs.cancel(conn, "c") is True
        assert jobs.claim(conn, "w", 60) is None
        assert jobs.depth(conn) == {"cancelled": 1}
