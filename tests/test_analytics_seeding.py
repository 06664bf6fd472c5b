"""`interop demo --seed-analytics N` is additive and safe: each run adds N synthetic studies after
those already there, in one transaction, so a run that fails (here: the database refuses a row
half-way through, a real fault raised by a trigger) writes nothing and keeps the earlier
synthetic studies; real facts are never touched, even one whose report id looks synthetic;
`interop analytics clear-synthetic` removes the synthetic studies only. Run as the operator runs
it (subprocesses) against a real PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from interop.store import analytics as queries
from interop.store.db import connect
from tests.helpers import ROOT
from tests.test_analytics import ctx, known  # noqa: F401  (fixtures: three real reports' facts)

ROW = "md5(s::text)"


def interop(db_url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": db_url}
    return subprocess.Popen([sys.executable, "-m", "interop.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def run(db_url: str, *args: str) -> tuple[int, str, str]:
    proc = interop(db_url, *args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def rows(conn: Any, synthetic: bool) -> dict[str, str]:
    """report id -> digest of the whole study row and its findings."""
    return {r["report_id"]: r["digest"] for r in conn.execute(
        "SELECT s.report_id, md5(s::text || coalesce((SELECT string_agg(f::text, '|' ORDER BY f.observation_id)"
        " FROM analytics.finding_fact f WHERE f.report_id = s.report_id), '')) AS digest"
        " FROM analytics.study_fact s WHERE s.synthetic = %s", (synthetic,))}


def test_seeding_adds_in_one_transaction_and_never_touches_real_facts(
        db_url: str, known: dict[str, str]) -> None:  # noqa: F811  (the fixture imported above)
    with connect(db_url, autocommit=True) as conn:
        # A real report whose id happens to look synthetic: written by the facts' upsert, as reports are.
        fact = dict(conn.execute("SELECT * FROM analytics.study_fact WHERE report_id = %s", (known["a"],)).fetchone())
        fact["report_id"] = "synthetic-5"
        queries.upsert_facts(conn, fact, [("obs-real", None, "X1", "real finding", 0.9, True, None, None, True, False)])
        real = rows(conn, synthetic=False)
    assert set(real) == {known["a"], known["b"], known["c"], "synthetic-5"}

    code, out, err = run(db_url, "demo", "--seed-analytics", "200")
    assert code == 0, err
    assert "200 synthetic studies added" in out and "(200 in all" in out
    with connect(db_url, autocommit=True) as conn:
        first = rows(conn, synthetic=True)
        assert len(first) == 200 and "synthetic-5" not in first  # numbered after the real look-alike
        assert rows(conn, synthetic=False) == real
        # The views were refreshed: the rollup counts every study.
        assert conn.execute("SELECT sum(studies) AS n FROM analytics.mv_study_daily").fetchone()["n"] == \
            conn.execute("SELECT count(*) AS n FROM analytics.study_fact WHERE report_status <> 'cancelled'"
                         ).fetchone()["n"]
        # The database refuses a finding of the 151st study of the next run (a real error, half-way).
        nxt = queries.synthetic_start(conn)
        conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                     " $$ BEGIN RAISE EXCEPTION 'could not extend file (injected)'; END $$")
        conn.execute("CREATE TRIGGER refuse_one BEFORE INSERT ON analytics.finding_fact FOR EACH ROW"
                     f" WHEN (NEW.observation_id = 's{nxt + 150}-2') EXECUTE FUNCTION refuse()")

    code, out, err = run(db_url, "demo", "--seed-analytics", "200")
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("interop demo --seed-analytics: failed, nothing was written and the synthetic studies"
                           " already there are kept (could not extend file (injected))")
    with connect(db_url, autocommit=True) as conn:
        assert rows(conn, synthetic=True) == first  # the earlier run's studies, unchanged
        assert rows(conn, synthetic=False) == real
        conn.execute("DROP TRIGGER refuse_one ON analytics.finding_fact")

    # Two runs at once take turns and both add.
    procs = [interop(db_url, "demo", "--seed-analytics", "150") for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    with connect(db_url, autocommit=True) as conn:
        now = rows(conn, synthetic=True)
        assert len(now) == 500 and {k: now[k] for k in first} == first
        assert rows(conn, synthetic=False) == real

    code, out, err = run(db_url, "analytics", "clear-synthetic")
    assert code == 0, err
    assert "500 synthetic studies removed" in out
    with connect(db_url, autocommit=True) as conn:
        assert rows(conn, synthetic=True) == {}
        assert rows(conn, synthetic=False) == real
        assert conn.execute("SELECT sum(studies) AS n FROM analytics.mv_study_daily").fetchone()["n"] == 4


def test_migration_0019_marks_what_earlier_seeding_wrote(db_url: str) -> None:
    """Facts the seeding wrote before the `synthetic` column (ids synthetic-N, key id 'synthetic')
    are marked by the migration; a real fact is not."""
    from interop.store.db import migrations

    sql = next(text for number, _name, text in migrations() if number == 19)
    with connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE analytics.study_fact DROP COLUMN synthetic")
        conn.execute("INSERT INTO analytics.study_fact (report_id, key_id, model_name, model_version, report_status,"
                     " ai_result_at) SELECT id, key, 'm', '1', 'final', now() FROM (VALUES ('synthetic-1', 'synthetic'),"
                     " ('synthetic-2', 'k1'), ('abc', 'synthetic')) AS v (id, key)")
        conn.execute(sql)
        marked = {r["report_id"]: r["synthetic"] for r in conn.execute(
            "SELECT report_id, synthetic FROM analytics.study_fact")}
    assert marked == {"synthetic-1": True, "synthetic-2": False, "abc": False}


def test_two_refreshes_at_once_replace_the_kept_forecasts_one_after_the_other(db_url: str) -> None:
    """Two workers with a due refresh each: the second waits for the first instead of breaking the
    kept forecasts' key (seen as a UniqueViolation and a retried job when the demo restarted)."""
    import threading

    failures: list[BaseException] = []

    def second() -> None:
        try:
            with connect(db_url, autocommit=True) as conn:
                queries.keep_forecasts(conn, {"k": {"by": "second"}})
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    with connect(db_url) as first:  # a transaction left open: the first refresh still writing
        first.execute("SELECT 1")  # begun here, so keep_forecasts' block is a savepoint in it, not committed
        queries.keep_forecasts(first, {"k": {"by": "first"}})
        other = threading.Thread(target=second)
        other.start()
        other.join(1.0)  # the second is held until the first commits
        first.commit()
    other.join(30)
    assert failures == []
    with connect(db_url) as conn:
        assert queries.kept_forecasts(conn, ["k"]) == {"k": {"by": "second"}}
