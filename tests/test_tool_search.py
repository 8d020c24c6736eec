"""Search finds tool results (schema step 4): a conversation is found by its server tools' results
and by the app's own tool results as it is found by what was said, with the same rules (any case,
the index for 3 characters or more and a scan below, the first message that holds it, a snippet of
the text that holds it), on SQLite and PostgreSQL; a running answer's results are not found until
it ends, and deletes, forks, imports and VACUUM keep the index in step."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import mcp_server
import pytest
from fake_dashscope import Reply
from support import wait_for
from test_tool_store import LAST_SEQ, ROUND_1, ROUND_2, STEPS, begin, dumps, finish, run, store

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
mcp_http = mcp_server.mcp_http  # a fixture: a started HTTP MCP server


def found(client, q, **params) -> dict:
    r = client.get(CONV, params={"q": q, **params})
    assert r.status_code == 200, r.text
    return r.json()


def ids(result) -> list[str]:
    return [c["session_id"] for c in result["conversations"]]


def match(client, q) -> dict:
    (conversation,) = found(client, q)["conversations"]
    return conversation["match"]


def result_step(seq, call_id, content) -> dict:
    data = {"id": call_id, "content": content, "duration_ms": 3, "outcome": "ok"}
    return {"type": "tool_result", "seq": seq, "text": 13, "reasoning": 5, "data": data}


def with_result(content: str) -> list[dict]:
    """STEPS, the first server result's text replaced."""
    return [STEPS[0], result_step(4, "call_1", content), *STEPS[2:]]


def tool_answer(client, sid, result="order 1: shipped", app_result="42", title="T"):
    """A conversation (titled so that no title matches): a question, an answer whose server tool
    returned `result`, the app's result `app_result`, and the last answer."""
    client.post(CONV, json={"session_id": sid, "title": title})
    uid, aid = begin(client, sid)
    finish(client, aid, ROUND_1 + ROUND_2, "tool_calls", dumps(with_result(result)), "think", LAST_SEQ)
    tid, bid = begin(client, sid, "", parent=aid, results=dumps([{"tool_call_id": "call_2", "content": app_result}]))
    finish(client, bid, "The answer is 42.")
    return uid, aid, tid, bid


def index_in_step(service) -> None:
    """SQLite: the tool results' index holds one document for each message not `streaming` that
    has tool text, under its search_id, and nothing else."""
    if not service.is_sqlite:
        return
    indexed = sorted(r["rowid"] for r in service.rows("SELECT rowid FROM messages_tool_search"))
    expected = sorted(
        r["search_id"]
        for r in service.rows("SELECT search_id, tool_steps, tool_results FROM messages WHERE search_id IS NOT NULL")
        if any(
            text != ""
            for text in [
                *(s["data"].get("content") for s in json.loads(r["tool_steps"] or "[]") if s["type"] == "tool_result"),
                *(t["content"] for t in json.loads(r["tool_results"] or "[]")),
            ]
            if text is not None
        )
    )
    assert indexed == expected
    service.rows("INSERT INTO messages_tool_search (messages_tool_search) VALUES ('integrity-check')")


def test_found_by_a_server_tools_result_over_the_api(make_service, fake, mcp_http):
    """End to end: a real MCP server's result, written by the round loop, found with its snippet."""
    service = make_service(CHATSVC_MCP_SERVERS=json.dumps({"t": mcp_http.entry()}))
    fake.push(
        Reply.tool_calls([("t__echo", {"text": "Quokka Zeppelin"})], content=["Asking. "]),
        Reply.answer(["Done."]),
    )
    with service.client() as client:
        wait_for(lambda: client.app.state.toolbox.find("t__echo") is not None, 20)
        client.post(CONV, json={"session_id": "s1", "title": "T"})
        r = client.post(f"{API}/chat/s1", json={"message": "say it"})
        assert r.status_code == 200, r.text
        answer = r.json()["message_id"]
        assert r.json()["steps"][1]["data"]["content"] == "echo: Quokka Zeppelin"
        # the arguments (and the question) do not hold "echo": only the result does
        assert match(client, "echo: quokka") == {"message_id": answer, "snippet": "echo: Quokka Zeppelin"}
        assert ids(found(client, "ZEPPELIN")) == ["s1"]
        index_in_step(service)


def test_found_by_the_apps_tool_result_over_the_api(client, service, fake):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = Reply.tool_calls([("get_weather", {"city": "杭州"})], content=["Let me look. "])
    fake.push(call, Reply.answer(["It is fine."]))
    client.post(CONV, json={"session_id": "s1", "title": "T"})
    assert client.post(f"{API}/chat/s1", json={"message": "Weather?", "tools": [weather]}).status_code == 200
    results = [{"tool_call_id": call.calls[0]["id"], "content": "晴朗的天气, 25°C in Hangzhou"}]
    r = client.post(f"{API}/chat/s1", json={"tool_results": results, "tools": [weather]})
    assert r.status_code == 200, r.text
    turn = client.get(f"{CONV}/s1").json()["messages"][2]
    assert turn["role"] == "tool"
    assert match(client, "25°c in") == {"message_id": turn["id"], "snippet": "晴朗的天气, 25°C in Hangzhou"}
    assert match(client, "晴朗")["message_id"] == turn["id"]  # 2 characters: the scan
    assert ids(found(client, "晴朗的天气")) == ["s1"]  # the index
    index_in_step(service)


def test_server_and_app_results_found_errors_not(client, service):
    _, aid, tid, _ = tool_answer(client, "s1", "Parcel in Xinjiang", "the app says Ulaanbaatar")
    assert match(client, "xinjiang") == {"message_id": aid, "snippet": "Parcel in Xinjiang"}
    assert match(client, "ULAANBAATAR") == {"message_id": tid, "snippet": "the app says Ulaanbaatar"}
    # the timed-out call's error text is not searched
    assert "The tool took longer" in STEPS[4]["data"]["error"]
    assert ids(found(client, "tool took longer")) == []
    index_in_step(service)


@pytest.mark.parametrize("q", ["hangzhou", "HANGZHOU", "HangZhou", "gZh", "西湖", "西湖边", "zh"])
def test_case_folding_and_short_queries(client, service, q):
    _, aid, _, _ = tool_answer(client, "s1", "Hangzhou, 西湖边的订单")
    tool_answer(client, "s2", "nothing here")
    assert match(client, q) == {"message_id": aid, "snippet": "Hangzhou, 西湖边的订单"}, q


def test_the_first_message_that_holds_it_and_a_long_results_snippet(client, service):
    # the question holds the word too: the match is the question, the first message that holds it
    client.post(CONV, json={"session_id": "s1", "title": "T"})
    uid, aid = begin(client, "s1", "Where is the walrus?")
    long = "x" * 200 + " the walrus is in the fridge " + "y" * 200
    finish(client, aid, "Looked.", "stop", dumps([STEPS[0], result_step(4, "call_1", long)]), last_seq=5)
    assert match(client, "walrus") == {"message_id": uid, "snippet": "Where is the walrus?"}
    # later answers do not change the first; the answer alone: a snippet of its result
    client.post(CONV, json={"session_id": "s2", "title": "T"})
    _, other = begin(client, "s2", "Anything?")
    finish(client, other, "Looked.", "stop", dumps([STEPS[0], result_step(4, "call_1", long)]), last_seq=5)
    (s2,) = [c for c in found(client, "in the fridge")["conversations"] if c["session_id"] == "s2"]
    assert s2["match"] == {
        "message_id": other,
        "snippet": "…" + "x" * 15 + " the walrus is in the fridge " + "y" * 59 + "…",
    }


def test_a_running_answers_results_are_found_once_it_ends(client, service):
    client.post(CONV, json={"session_id": "s1", "title": "T"})
    _, aid = begin(client, "s1")
    steps = dumps(with_result("Running Narwhal"))
    for n in range(3):  # checkpoints of a running answer index nothing
        run(client, store(client).answers.checkpoint, [chatsvc.Checkpoint(aid, ROUND_1, None, 5 + n, steps=steps)])
        for q in ("narwhal", "na"):
            assert ids(found(client, q)) == [], q
        index_in_step(service)
    if service.is_sqlite:
        assert service.rows("SELECT COUNT(*) AS n FROM messages_tool_search")[0]["n"] == 0
    finish(client, aid, ROUND_1 + ROUND_2, "tool_calls", steps, last_seq=LAST_SEQ)
    assert match(client, "narwhal") == {"message_id": aid, "snippet": "Running Narwhal"}
    index_in_step(service)


def test_an_interrupted_answers_checkpointed_results_are_found(client, service):
    client.post(CONV, json={"session_id": "s1", "title": "T"})
    _, aid = begin(client, "s1")
    steps = dumps([STEPS[0], result_step(4, "call_1", "Cut short by a crash")])
    run(client, store(client).answers.checkpoint, [chatsvc.Checkpoint(aid, ROUND_1, None, 5, steps=steps)])
    assert ids(found(client, "crash")) == []
    assert [r["id"] for r in run(client, store(client).answers.recover_interrupted, None)] == [aid]
    assert match(client, "crash") == {"message_id": aid, "snippet": "Cut short by a crash"}
    index_in_step(service)


def test_deleted_messages_leave_the_index(client, service):
    _, aid, _, _ = tool_answer(client, "s1", "Platypus parcel", "Platypus from the app")
    tool_answer(client, "s2", "kept result")
    assert ids(found(client, "platypus")) == ["s1"]
    # a deleted branch (the answer and everything after it)
    assert client.delete(f"{CONV}/s1/messages/{aid}").status_code == 200
    assert ids(found(client, "platypus")) == [] and ids(found(client, "pl")) == []
    index_in_step(service)
    # a purge, and a deleted conversation
    tool_answer(client, "s3", "Axolotl parcel")
    assert client.delete(f"{CONV}/s3/context?purge=true").status_code == 200
    tool_answer(client, "s4", "Capybara parcel")
    assert client.delete(f"{CONV}/s4").status_code == 204
    assert ids(found(client, "axolotl")) == ids(found(client, "capybara")) == []
    index_in_step(service)
    # new messages (which may take the deleted ones' search ids) are not found by the old results
    for n in range(4):
        client.post(CONV, json={"session_id": f"n{n}", "title": "T"})
        _, other = begin(client, f"n{n}", "plain")
        finish(client, other, "plain words")
    assert ids(found(client, "platypus")) == ids(found(client, "axolotl")) == ids(found(client, "capybara")) == []
    assert ids(found(client, "kept result")) == ["s2"]
    index_in_step(service)


def test_a_forks_and_an_imports_copies_are_found(client, service):
    _, _, tid, _ = tool_answer(client, "s1", "Pangolin parcel", "Okapi from the app")
    r = client.post(f"{CONV}/s1/fork", json={"message_id": tid, "session_id": "fork"})
    assert r.status_code == 201, r.text
    r = client.post(f"{CONV}/import", json=client.get(f"{CONV}/s1/export").json())
    assert r.status_code == 201, r.text
    imported = r.json()["session_id"]
    for q in ("pangolin", "okapi", "Pa", "Ok"):
        assert sorted(ids(found(client, q))) == sorted(["s1", "fork", imported]), q
    copies = {sid: client.get(f"{CONV}/{sid}").json()["messages"] for sid in ("fork", imported)}
    assert match_of(found(client, "okapi"), "fork") == {
        "message_id": copies["fork"][2]["id"],
        "snippet": "Okapi from the app",
    }
    assert match_of(found(client, "pangolin"), imported) == {
        "message_id": copies[imported][1]["id"],
        "snippet": "Pangolin parcel",
    }
    index_in_step(service)
    # the original gone, the copies are still found
    assert client.delete(f"{CONV}/s1").status_code == 204
    assert sorted(ids(found(client, "pangolin"))) == sorted(["fork", imported])
    index_in_step(service)


def match_of(result, sid) -> dict:
    (conversation,) = [c for c in result["conversations"] if c["session_id"] == sid]
    return conversation["match"]


def test_the_index_survives_vacuum_on_sqlite_and_serves_ilike_on_postgresql(client, service):
    """SQLite: VACUUM may renumber the messages' rowids; the index is linked by search_id, which it
    keeps. PostgreSQL: the partial trigram index of chatsvc_tool_text serves the search's ILIKE."""
    for n in range(6):
        tool_answer(client, f"s{n}", f"Result number {n} of a wombat")
    for n in (0, 2):  # holes in the rowids
        assert client.delete(f"{CONV}/s{n}").status_code == 204
    if service.is_sqlite:
        service.rows("VACUUM")
    else:
        (index,) = service.rows("SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_tool_search'")
        assert "chatsvc_tool_text(tool_steps, tool_results) gin_trgm_ops" in index["indexdef"]
        assert "WHERE ((status <> 'streaming'::text) AND" in index["indexdef"]  # checkpoints do not touch it
        assert "messages_tool_search" in asyncio.run(pg_plan(service.url))
    assert sorted(ids(found(client, "wombat"))) == ["s1", "s3", "s4", "s5"]
    assert ids(found(client, "number 4")) == ["s4"]
    assert client.delete(f"{CONV}/s4").status_code == 204
    assert sorted(ids(found(client, "wombat"))) == ["s1", "s3", "s5"]
    index_in_step(service)


async def pg_plan(url) -> str:
    """The plan of the search's tool arm, sequential scans off (the tables are small)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET enable_seqscan = off")
        rows = await conn.fetch(
            "EXPLAIN SELECT id FROM messages WHERE status != 'streaming'"
            " AND (tool_steps IS NOT NULL OR tool_results IS NOT NULL)"
            " AND chatsvc_tool_text(tool_steps, tool_results) ILIKE '%wombat%'"
        )
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.close()
