"""Deep trees on a PostgreSQL database whose statistics are stale (a new deployment; right after a
large import): every walk of the tree finds each step through an index, whatever the planner
believes about the table. Asserted on the plans of the statements the service ran, which depend
only on the statistics, not on timing (bench/tree_pg.py measures the times)."""

from __future__ import annotations

import asyncio
import json

import pytest
from support import EMPTY_POSTGRES, Service, pg

import chatsvc

CONV = "/api/v1/context/conversations"
CHAIN = 10_000  # messages in one chain, written straight into the table: nothing has analyzed it


@pytest.fixture
def deep(postgres_database, fake):
    pg(postgres_database, EMPTY_POSTGRES)
    service = Service(postgres_database, fake)
    with service.client() as client:
        assert client.post(CONV, json={"session_id": "deep"}).status_code == 201
        service.rows("ALTER TABLE messages SET (autovacuum_enabled = false)")  # the statistics stay stale
        service.rows(
            "INSERT INTO messages (id, parent_id, session_id, role, content, status, created_at, updated_at)"
            " SELECT 'm' || lpad(n::text, 7, '0'), CASE WHEN n > 0 THEN 'm' || lpad((n - 1)::text, 7, '0') END,"
            " 'deep', CASE WHEN n % 2 = 0 THEN 'user' ELSE 'assistant' END, 'message ' || n, 'complete', 'x', 'x'"
            " FROM generate_series(0, ?::integer - 1) AS n",
            CHAIN,
        )
        service.rows("UPDATE conversations SET current_message_id = ?", f"m{CHAIN - 1:07d}")
        yield service, client


def seq_scans_in_walks(plan: dict, in_walk: bool = False) -> list[str]:
    """The relations a recursive step of this plan reads by a sequential scan."""
    found = []
    if in_walk and plan["Node Type"] == "Seq Scan":
        found.append(plan["Relation Name"])
    for n, child in enumerate(plan.get("Plans", ())):
        # a Recursive Union's second child is the step, run once per level
        found += seq_scans_in_walks(child, in_walk or (plan["Node Type"] == "Recursive Union" and n == 1))
    return found


def test_the_walks_of_a_deep_tree_are_index_lookups_on_stale_statistics(deep, monkeypatch):
    """Before the fix, the delete's walk of the branch below a message was a join that PostgreSQL,
    on these statistics, made a hash join over a sequential scan of the whole table at every level:
    deleting a 10,000-deep branch ran into the 30 s statement timeout and answered "try again"."""
    service, client = deep
    walks: list[tuple[str, dict]] = []
    all_rows = chatsvc.Database.fetch_all

    async def recorded(self, sql, values=None, role=chatsvc.READ):
        if "WITH RECURSIVE" in sql:
            walks.append((sql, dict(values or {})))
        return await all_rows(self, sql, values, role)

    monkeypatch.setattr(chatsvc.Database, "fetch_all", recorded)
    r = client.delete(f"{CONV}/deep/messages/m{CHAIN - 500:07d}")  # the last 500 messages
    assert r.status_code == 200, r.text
    assert r.json()["current_message_id"] == f"m{CHAIN - 501:07d}"
    r = client.patch(f"{CONV}/deep", json={"current_message_id": "m0000000"})  # down the whole chain
    assert r.status_code == 200 and r.json()["current_message_id"] == f"m{CHAIN - 501:07d}", r.text
    r = client.post(f"{CONV}/deep/fork", json={"message_id": f"m{CHAIN - 501:07d}", "session_id": "copy"})
    assert r.status_code == 201 and r.json()["message_count"] == CHAIN - 500, r.text
    r = client.get(f"{CONV}/deep/export?format=markdown")  # up the whole current branch
    assert r.status_code == 200 and r.text.count("message ") == CHAIN - 500, r.text[:200]
    monkeypatch.undo()
    assert service.rows("SELECT reltuples FROM pg_class WHERE relname = 'messages'") == [{"reltuples": -1}]
    assert len(walks) >= 5  # the delete's two (its check and its delete), the switch's, the fork's, the branch's

    async def plans() -> list[dict]:
        store = chatsvc.Store(service.url)
        await store.open()
        try:
            return [(await store.db.fetch_one("EXPLAIN (FORMAT JSON) " + sql, values)) for sql, values in walks]
        finally:
            await store.close()

    for (sql, _), row in zip(walks, asyncio.run(plans()), strict=True):
        plan = row["QUERY PLAN"]
        plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
        assert seq_scans_in_walks(plan) == [], sql
