"""The resource store on a real PostgreSQL: versions, history, and a search index that never
shows a half-written resource to a concurrent reader."""
from __future__ import annotations

import threading

from interop.store import resources
from interop.store.db import connect
from interop.store.search_params import load
from tests.helpers import ROOT as REPO_ROOT

PARAMS = load(REPO_ROOT / "mappings")


def test_versions_and_history(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        task = resources.create(conn, {"resourceType": "Task", "status": "requested", "intent": "order"}, PARAMS["Task"])
        task["status"] = "in-progress"
        updated, created = resources.update(conn, task, PARAMS["Task"])
        assert not created and updated["meta"]["versionId"] == "2"
        assert [v.body["status"] for v in resources.versions(conn, "Task", task["id"])] == ["in-progress", "requested"]
        assert resources.vread(conn, "Task", task["id"], 1)["status"] == "requested"


def test_search_index_is_never_seen_half_written(db_url: str) -> None:
    """An update on an autocommit connection (as the worker does) is still one transaction."""
    with connect(db_url, autocommit=True) as writer:
        task = resources.create(writer, {"resourceType": "Task", "status": "requested", "intent": "order",
                                         "focus": {"reference": "ImagingStudy/s1"}}, PARAMS["Task"])
        stop = threading.Event()
        misses: list[int] = []

        def read() -> None:
            with connect(db_url, autocommit=True) as reader:
                query = resources.Query(criteria=[resources.Criterion(
                    PARAMS["Task"]["focus"], [(resources.ANY_SYSTEM, "ImagingStudy/s1")])])
                while not stop.is_set():
                    if resources.search(reader, "Task", query)[1] == []:
                        misses.append(1)

        thread = threading.Thread(target=read)
        thread.start()
        for i in range(300):
            task["status"] = "in-progress" if i % 2 else "requested"
            resources.update(writer, task, PARAMS["Task"])
        stop.set()
        thread.join()
    assert misses == []
