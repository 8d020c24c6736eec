"""The stored shape of tool calls (schema step 4): an answer's steps (messages.tool_steps) and a
tool-results turn (messages.tool_results), written through the store's API (Turn, Checkpoint,
FinalState) as the relay writes them, then read, presented, forked, exported, imported and
written as Markdown, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json

import pytest

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


REASONING = "think"
ROUND_1, ROUND_2 = "Let me look. ", "Found it. "
CALL_1 = {"id": "call_1", "name": "orders__find", "arguments": '{"q": "北京"}', "round": 1, "server": "orders",
          "tool": "find"}  # fmt: skip
RESULT_1 = {"id": "call_1", "content": "order 1: shipped", "duration_ms": 8, "outcome": "ok"}
CALL_2 = {"id": "call_2", "name": "app_lookup", "arguments": "", "round": 2}
CALL_3 = {"id": "call_3", "name": "orders__find", "arguments": "{}", "round": 2, "server": "orders", "tool": "find"}
RESULT_3 = {"id": "call_3", "error": "The tool took longer than 30 s.", "duration_ms": 30000, "outcome": "timeout"}
STEPS = [
    {"type": "tool_call", "seq": 3, "text": 13, "reasoning": 5, "data": CALL_1},
    {"type": "tool_result", "seq": 4, "text": 13, "reasoning": 5, "data": RESULT_1},
    {"type": "tool_call", "seq": 6, "text": 23, "reasoning": 5, "data": CALL_2},
    {"type": "tool_call", "seq": 7, "text": 23, "reasoning": 5, "data": CALL_3},
    {"type": "tool_result", "seq": 8, "text": 23, "reasoning": 5, "data": RESULT_3},
]
LAST_SEQ = 9
RESULTS = [{"tool_call_id": "call_2", "content": "42"}]


def run(client, fn, *args):
    """A store coroutine, run on the app's own loop."""
    return client.portal.call(fn, *args)


def store(client) -> chatsvc.Store:
    return client.app.state.store


def begin(client, sid, question="Where is my order?", parent=None, results=None, new_question=True, question_id=None):
    """A turn as the relay begins it: the question (or tool results) and a `streaming` answer."""
    conversation, _ = run(client, store(client).tree.chat_context, "", sid, 1)
    last = conversation["last_id"] if conversation else ""
    uid = question_id or chatsvc.new_message_id(last)
    aid = chatsvc.new_message_id(uid)
    turn = chatsvc.Turn("", sid, aid, "qwen-plus", uid, question, new_question, parent, tool_results=results)
    run(client, store(client).tree.begin_turn, turn)
    return uid, aid


def finish(client, aid, content, finish_reason="stop", steps=None, reasoning=None, last_seq=3, status="complete"):
    final = chatsvc.FinalState(status, content, reasoning, finish_reason, None, None, None, last_seq, steps=steps)
    assert run(client, store(client).answers.finish, aid, final)


def tool_conversation(client, sid="t"):
    """A question; an answer of two tool rounds (a server tool's result, then a call to the app's tool
    and a server call that timed out) that ended "tool_calls"; the app's results; the answer to them."""
    uid, aid = begin(client, sid)
    finish(client, aid, ROUND_1 + ROUND_2, "tool_calls", dumps(STEPS), REASONING, LAST_SEQ)
    tid, bid = begin(client, sid, "", parent=aid, results=dumps(RESULTS))
    finish(client, bid, "The answer is 42.")
    return uid, aid, tid, bid


def presented_steps():
    return [{"type": s["type"], "data": s["data"]} for s in STEPS]


def test_pending_tool_calls_are_the_last_rounds_client_calls_without_a_result():
    assert chatsvc.pending_tool_calls(STEPS) == [{"id": "call_2", "name": "app_lookup", "arguments": ""}]
    assert chatsvc.pending_tool_calls([]) == []
    assert chatsvc.pending_tool_calls(STEPS[:2]) == []  # a server call, answered
    older = {**CALL_2, "id": "call_0", "round": 1}  # a client call of an earlier round is not pending
    answered = {"type": "tool_result", "seq": 9, "text": 23, "reasoning": 5,
                "data": {"id": "call_2", "content": "x", "duration_ms": 1, "outcome": "ok"}}  # fmt: skip
    steps = [{"type": "tool_call", "seq": 2, "text": 0, "reasoning": 0, "data": older}, *STEPS]
    assert [c["id"] for c in chatsvc.pending_tool_calls(steps)] == ["call_2"]
    assert chatsvc.pending_tool_calls([*STEPS, answered]) == []
    two = {**CALL_2, "id": "call_4", "name": "app_other", "arguments": '{"a":1}'}
    steps = [*STEPS, {"type": "tool_call", "seq": 9, "text": 23, "reasoning": 5, "data": two}]
    assert chatsvc.pending_tool_calls(steps) == [
        {"id": "call_2", "name": "app_lookup", "arguments": ""},
        {"id": "call_4", "name": "app_other", "arguments": '{"a":1}'},
    ]


def test_reads_present_steps_pending_calls_and_the_tool_role(client, service):
    uid, aid, tid, bid = tool_conversation(client)
    rows = service.rows("SELECT id, role, content, tool_steps, tool_results FROM messages ORDER BY id")
    assert rows == [
        {"id": uid, "role": "user", "content": "Where is my order?", "tool_steps": None, "tool_results": None},
        {"id": aid, "role": "assistant", "content": ROUND_1 + ROUND_2, "tool_steps": dumps(STEPS),
         "tool_results": None},
        {"id": tid, "role": "user", "content": "", "tool_steps": None, "tool_results": dumps(RESULTS)},
        {"id": bid, "role": "assistant", "content": "The answer is 42.", "tool_steps": None, "tool_results": None},
    ]  # fmt: skip
    branch = client.get(f"{CONV}/t").json()["messages"]
    assert [m["id"] for m in branch] == [uid, aid, tid, bid]
    question, answer, results, last = branch
    assert "steps" not in question and "tool_calls" not in question and question["role"] == "user"
    assert answer["role"] == "assistant" and answer["finish_reason"] == "tool_calls"
    assert answer["steps"] == presented_steps()  # type and data only: no seq, text or reasoning
    assert answer["tool_calls"] == [{"id": "call_2", "name": "app_lookup", "arguments": ""}]
    assert answer["content"] == ROUND_1 + ROUND_2 and answer["reasoning_content"] == REASONING
    assert results == {
        "id": tid, "parent_id": aid, "sibling_ids": [tid], "role": "tool", "content": "", "reasoning_content": None,
        "tool_results": RESULTS, "status": "complete", "in_context": True, "model": None, "finish_reason": None,
        "error": None, "usage": None, "created_at": results["created_at"]}  # fmt: skip
    assert "steps" not in last and "tool_calls" not in last and last["role"] == "assistant"
    # the other reads say the same: a page of the branch, every message of the tree, the message alone
    page = client.get(f"{CONV}/t/messages").json()["messages"]
    assert page == branch
    tree = client.get(f"{CONV}/t/messages?tree=true").json()["messages"]
    assert tree == [{k: v for k, v in m.items() if k != "sibling_ids"} for m in branch]
    # an answer that ended otherwise has its steps but no pending calls
    _, other = begin(client, "t", "again", parent=bid)
    finish(client, other, ROUND_1, "stop", dumps(STEPS[:2]), last_seq=5)
    shown = client.get(f"{CONV}/t").json()["messages"][-1]
    assert shown["steps"] == presented_steps()[:2] and "tool_calls" not in shown


def test_a_regenerated_tool_results_turn_keeps_its_row(client, service):
    _, _, tid, _ = tool_conversation(client)
    _, again = begin(client, "t", "", question_id=tid, new_question=False)  # a regeneration under the results
    finish(client, again, "Still 42.")
    assert service.rows("SELECT COUNT(*) AS n FROM messages WHERE tool_results IS NOT NULL") == [{"n": 1}]
    branch = client.get(f"{CONV}/t").json()["messages"]
    assert [m["role"] for m in branch] == ["user", "assistant", "tool", "assistant"]
    assert branch[-1]["content"] == "Still 42." and len(branch[-1]["sibling_ids"]) == 2


def test_a_checkpoint_without_steps_keeps_the_stored_ones(client, service):
    _, aid = begin(client, "c")
    answers = store(client).answers

    def checkpoint(content, seq, steps):
        run(client, answers.checkpoint, [chatsvc.Checkpoint(aid, content, REASONING, seq, steps=steps)])
        (row,) = service.rows("SELECT content, last_seq, tool_steps FROM messages WHERE id = ?", aid)
        return row

    assert checkpoint(ROUND_1, 3, None) == {"content": ROUND_1, "last_seq": 3, "tool_steps": None}
    assert checkpoint(ROUND_1, 4, dumps(STEPS[:1])) == {
        "content": ROUND_1,
        "last_seq": 4,
        "tool_steps": dumps(STEPS[:1]),
    }
    assert checkpoint(ROUND_1, 5, dumps(STEPS[:2]))["tool_steps"] == dumps(STEPS[:2])
    row = checkpoint(ROUND_1 + "Fou", 6, None)  # text only: the steps stay as they are
    assert row == {"content": ROUND_1 + "Fou", "last_seq": 6, "tool_steps": dumps(STEPS[:2])}
    # a reader sees the steps of a running answer
    running = client.get(f"{CONV}/c").json()["messages"][-1]
    assert running["status"] == "streaming" and running["steps"] == presented_steps()[:2]
    assert "tool_calls" not in running
    # the final write sets them (here: all of them), and a checkpoint after it changes nothing
    finish(client, aid, ROUND_1 + ROUND_2, "tool_calls", dumps(STEPS), REASONING, LAST_SEQ)
    assert checkpoint("late", 99, "[]")["tool_steps"] == dumps(STEPS)
    # a final write without steps leaves none (the relay's final state holds every step)
    _, bid = begin(client, "c", "next")
    run(client, answers.checkpoint, [chatsvc.Checkpoint(bid, "x", None, 2, steps=dumps(STEPS[:1]))])
    finish(client, bid, "x", steps=None)
    assert service.rows("SELECT tool_steps FROM messages WHERE id = ?", bid) == [{"tool_steps": None}]


def test_an_interrupted_answer_keeps_its_checkpointed_steps(client, service):
    _, aid = begin(client, "i")
    run(client, store(client).answers.checkpoint, [chatsvc.Checkpoint(aid, ROUND_1, None, 5, steps=dumps(STEPS[:2]))])
    recovered = run(client, store(client).answers.recover_interrupted, None)
    assert [r["id"] for r in recovered] == [aid]
    shown = client.get(f"{CONV}/i").json()["messages"][-1]
    assert shown["status"] == "interrupted" and shown["steps"] == presented_steps()[:2]


def test_nul_and_lone_surrogates_are_cleaned_before_they_are_stored(client, service):
    dirty = {"id": "call_1", "content": "a\x00b\ud800c", "duration_ms": 1, "outcome": "ok"}
    steps = [STEPS[0], {**STEPS[1], "data": dirty}]
    text = dumps(steps)
    assert "\\u0000" in text and "\ud800" in text  # json.dumps escapes NUL and writes the surrogate as it is
    _, aid = begin(client, "n")
    run(client, store(client).answers.checkpoint, [chatsvc.Checkpoint(aid, ROUND_1, None, 5, steps=text)])
    (row,) = service.rows("SELECT tool_steps FROM messages WHERE id = ?", aid)
    assert json.loads(row["tool_steps"])[1]["data"]["content"] == "a\ufffdb\ufffdc"
    finish(client, aid, ROUND_1 + ROUND_2, "tool_calls", dumps([*steps, STEPS[2]]), last_seq=LAST_SEQ)
    # a literal backslash before "u0000" is text, not an escape: kept
    results = dumps([{"tool_call_id": "call_2", "content": "\\u0000 and \x00 and \udfff"}])
    _, bid = begin(client, "n", "", parent=aid, results=results)
    finish(client, bid, "ok")
    branch = client.get(f"{CONV}/n").json()["messages"]
    assert branch[1]["steps"][1]["data"]["content"] == "a\ufffdb\ufffdc"
    assert branch[2]["tool_results"] == [{"tool_call_id": "call_2", "content": "\\u0000 and \ufffd and \ufffd"}]
    assert chatsvc.storable_json(None) is None


def test_a_fork_copies_the_steps_and_the_results(client, service):
    _, _, tid, bid = tool_conversation(client)
    for end, sid in ((tid, "f1"), (bid, "f2")):
        r = client.post(f"{CONV}/t/fork", json={"message_id": end, "session_id": sid})
        assert r.status_code == 201, r.text
    original = client.get(f"{CONV}/t").json()["messages"]
    forked = client.get(f"{CONV}/f2").json()["messages"]
    drop = ("id", "parent_id", "sibling_ids")
    assert [{k: v for k, v in m.items() if k not in drop} for m in forked] == [
        {k: v for k, v in m.items() if k not in drop} for m in original
    ]
    assert forked[1]["tool_calls"] == original[1]["tool_calls"] and forked[2]["role"] == "tool"
    stored = service.rows("SELECT session_id, tool_steps, tool_results FROM messages WHERE session_id IN ('t', 'f1')"
                          " ORDER BY session_id, id")  # fmt: skip
    assert [(r["tool_steps"], r["tool_results"]) for r in stored if r["session_id"] == "f1"] == [
        (r["tool_steps"], r["tool_results"]) for r in stored if r["session_id"] == "t"
    ][:3]


def test_export_import_export_is_the_same_but_ids_tool_call_ids_kept(client):
    tool_conversation(client)
    doc = client.get(f"{CONV}/t/export").json()
    assert doc["version"] == 3
    question, answer, results, last = doc["messages"]
    assert answer["tool_steps"] == STEPS and answer["last_seq"] == LAST_SEQ  # as stored, seq and offsets included
    assert results["role"] == "user" and results["content"] == "" and results["tool_results"] == RESULTS
    assert question["tool_steps"] is None and question["tool_results"] is None and question["last_seq"] is None
    assert last["tool_steps"] is None and last["last_seq"] == 3
    r = client.post(f"{CONV}/import", json=doc)
    assert r.status_code == 201, r.text
    again = client.get(f"{CONV}/{r.json()['session_id']}/export").json()
    names = {}
    for a, b in zip(doc["messages"], again["messages"], strict=True):
        names[b["id"]] = a["id"]
    renamed = copy.deepcopy(again)
    for m in renamed["messages"]:
        m["id"], m["parent_id"] = names[m["id"]], names.get(m["parent_id"])
    renamed["conversation"]["current_message_id"] = names[renamed["conversation"]["current_message_id"]]
    for name in ("session_id", "created_at", "updated_at"):
        renamed["conversation"][name] = doc["conversation"][name]
    assert renamed | {"exported_at": None} == doc | {"exported_at": None}
    assert not set(names) & set(names.values())  # new message ids; the call ids are the model's, kept
    shown = client.get(f"{CONV}/{r.json()['session_id']}").json()["messages"]
    assert shown[1]["tool_calls"] == [{"id": "call_2", "name": "app_lookup", "arguments": ""}]
    assert shown[2]["role"] == "tool" and shown[2]["tool_results"] == RESULTS
    # a version 1 file (no tool fields) still imports
    new_fields = ("last_seq", "tool_steps", "tool_results")
    old = {**doc, "version": 1, "messages": [{k: v for k, v in m.items() if k not in new_fields}
                                             for m in doc["messages"][:2]]}  # fmt: skip
    del old["files"]  # version 3's
    old["messages"][1]["finish_reason"] = "stop"
    old["conversation"]["current_message_id"] = None
    r = client.post(f"{CONV}/import", json=old)
    assert r.status_code == 201, r.text
    shown = client.get(f"{CONV}/{r.json()['session_id']}/export").json()["messages"]
    assert [(m["role"], m["last_seq"], m["tool_steps"], m["tool_results"]) for m in shown] == [
        ("user", None, None, None), ("assistant", None, None, None)]  # fmt: skip


def a_file() -> dict:
    """A valid version 2 file: the tool conversation of tool_conversation, as its export says it."""
    base = {"reasoning_content": None, "status": "complete", "model": None, "finish_reason": None, "error": None,
            "usage": None, "created_at": "2026-01-01T00:00:00.000Z", "in_context": True, "last_seq": None,
            "tool_steps": None, "tool_results": None}  # fmt: skip
    return {
        "format": "chatsvc.conversation",
        "version": 2,
        "conversation": {"session_id": None, "title": None},
        "messages": [
            {**base, "id": "q", "parent_id": None, "role": "user", "content": "Where is my order?"},
            {**base, "id": "a", "parent_id": "q", "role": "assistant", "content": ROUND_1 + ROUND_2,
             "reasoning_content": REASONING, "finish_reason": "tool_calls", "last_seq": LAST_SEQ,
             "tool_steps": copy.deepcopy(STEPS)},
            {**base, "id": "r", "parent_id": "a", "role": "user", "content": "",
             "tool_results": copy.deepcopy(RESULTS)},
            {**base, "id": "b", "parent_id": "r", "role": "assistant", "content": "42", "last_seq": 3},
        ],
    }  # fmt: skip


def changed(change) -> dict:
    doc = a_file()
    change(doc["messages"])
    return doc


def step(n, **fields):
    def change(messages):
        messages[1]["tool_steps"][n].update(fields)

    return change


def data(n, **fields):
    def change(messages):
        messages[1]["tool_steps"][n]["data"].update(fields)

    return change


def without(n, *names, of="data"):
    def change(messages):
        target = messages[1]["tool_steps"][n]
        for name in names:
            (target[of] if of else target).pop(name)

    return change


def results(value):
    def change(messages):
        messages[2]["tool_results"] = value

    return change


def message(n, **fields):
    def change(messages):
        messages[n].update(fields)

    return change


S = "messages[1].tool_steps"
R = "messages[2].tool_results"


@pytest.mark.parametrize(
    "doc, detail",
    [
        (changed(message(1, tool_steps={"a": 1})), f"{S}: must be a list or null."),
        (changed(message(0, tool_steps=[])), "messages[0].tool_steps: must be null: only an answer has tool steps."),
        (changed(message(1, last_seq=None)), "messages[1].last_seq: must be a whole number above each tool step's"),
        (changed(message(1, last_seq="9")), "messages[1].last_seq: must be a whole number from 0 to 9007199254740991"),
        (changed(message(1, last_seq=-1)), "messages[1].last_seq: must be a whole number from 0"),
        (changed(lambda m: m[1]["tool_steps"].__setitem__(0, "x")), f"{S}[0]: must be an object."),
        (changed(step(0, extra=1)), f"{S}[0].extra: unknown field"),
        (changed(without(0, "data", of=None)), f"{S}[0].data: is required."),
        (changed(without(0, "seq", of=None)), f"{S}[0].seq: is required."),
        (changed(step(0, type="tool_said")), f"{S}[0].type: must be 'tool_call' or 'tool_result'."),
        (changed(step(4, seq=LAST_SEQ)), f"{S}[4].seq: must be a whole number above the seq of the step before it"
                                         f" and below the message's last_seq ({LAST_SEQ})."),
        (changed(step(1, seq=3)), f"{S}[1].seq: must be a whole number above the seq of the step before it"),
        (changed(step(0, seq=-1)), f"{S}[0].seq: must be a whole number above"),
        (changed(step(0, seq=True)), f"{S}[0].seq: must be a whole number above"),
        (changed(step(0, seq=3.0)), f"{S}[0].seq: must be a whole number above"),
        (changed(step(4, text=24)), f"{S}[4].text: must be a whole number from the text of the step before it (23)"
                                    " to the length of the message's content (23)."),
        (changed(step(1, text=12)), f"{S}[1].text: must be a whole number from the text of the step before it (13)"),
        (changed(step(0, reasoning=6)), f"{S}[0].reasoning: must be a whole number from the reasoning of the step"
                                        " before it (0) to the length of the message's reasoning_content (5)."),
        (changed(step(0, data=[])), f"{S}[0].data: must be an object."),
        (changed(without(0, "id")), f"{S}[0].data.id: must be a string."),
        (changed(data(0, id="")), f"{S}[0].data.id: must not be empty."),
        (changed(data(0, id=7)), f"{S}[0].data.id: must be a string."),
        (changed(data(0, content="x")), f"{S}[0].data.content: unknown field; allowed: id, name, arguments, round"),
        (changed(data(1, name="x")), f"{S}[1].data.name: unknown field; allowed: id, content, error"),
        (changed(without(0, "name")), f"{S}[0].data.name: must be a string."),
        (changed(data(0, name="")), f"{S}[0].data.name: must not be empty."),
        (changed(data(0, arguments={"q": 1})), f"{S}[0].data.arguments: must be a string."),
        (changed(data(0, round=0)), f"{S}[0].data.round: must be a whole number from 1"),
        (changed(without(0, "round")), f"{S}[0].data.round: must be a whole number from 1"),
        (changed(without(0, "tool")), f"{S}[0].data.tool: must be given with the other."),
        (changed(data(0, server=None)), f"{S}[0].data.server: must be a string."),
        (changed(data(3, id="call_2")), f"{S}[3].data.id: is the id of an earlier call of this answer."),
        (changed(data(1, id="call_9")), f"{S}[1].data.id: must be the id of an earlier call of this answer"),
        (changed(data(4, id="call_1")), f"{S}[4].data.id: must be the id of an earlier call of this answer that"
                                        " has no result yet."),
        (changed(data(1, error="x")), f"{S}[1].data.content: a result has either a content or an error"),
        (changed(without(1, "content")), f"{S}[1].data.content: a result has either a content or an error"),
        (changed(data(1, content=None)), f"{S}[1].data.content: must be a string."),
        (changed(data(1, content="a\x00b")), f"{S}[1].data.content: must not contain NUL"),
        (changed(data(0, arguments="\ud800")), f"{S}[0].data.arguments: contains an unpaired surrogate"),
        (changed(data(4, error="\x00")), f"{S}[4].data.error: must not contain NUL"),
        (changed(data(1, duration_ms=-1)), f"{S}[1].data.duration_ms: must be a whole number from 0"),
        (changed(data(1, duration_ms="8")), f"{S}[1].data.duration_ms: must be a whole number from 0"),
        (changed(data(1, outcome="fine")), f"{S}[1].data.outcome: must be one of ok, error, timeout"),
        (changed(results({"a": 1})), f"{R}: must be a list of at least one result, or null."),
        (changed(results([])), f"{R}: must be a list of at least one result, or null."),
        (changed(message(1, tool_results=RESULTS)), "messages[1].tool_results: must be null but on a user message"),
        (changed(message(2, content="hi")), f"{R}: must be null but on a user message whose content is empty"),
        (changed(message(1, finish_reason="stop")), f'{R}: must answer the calls of its parent, an answer that ended'
                                                    ' with finish_reason "tool_calls".'),
        (changed(message(2, parent_id=None)), f"{R}: must answer the calls of its parent"),
        (changed(results(["x"])), f"{R}[0]: must be an object."),
        (changed(results([{"tool_call_id": "call_2", "content": "1", "x": 1}])), f"{R}[0].x: unknown field"),
        (changed(results([{"tool_call_id": 2, "content": "1"}])), f"{R}[0].tool_call_id: must be a string."),
        (changed(results([{"tool_call_id": "call_1", "content": "1"}])),
         f"{R}[0].tool_call_id: must be the id of a call its parent waits on, given once."),
        (changed(results([{"tool_call_id": "call_2", "content": "1"}] * 2)), f"{R}[1].tool_call_id: must be the id"),
        (changed(results([{"tool_call_id": "call_2", "content": None}])), f"{R}[0].content: must be a string."),
        (changed(results([{"tool_call_id": "call_2", "content": "\x00"}])), f"{R}[0].content: must not contain NUL"),
        (changed(lambda m: m[1]["tool_steps"].append({"type": "tool_call", "seq": 8, "text": 23, "reasoning": 5,
                 "data": {**CALL_2, "id": "call_5"}}) or m[1]["tool_steps"].pop(4)),
         f'{R}: must answer every call its parent waits on; "call_5" has no result.'),
        (a_file() | {"version": 1}, "messages[0].last_seq: unknown field"),
        (a_file() | {"version": 4}, "format: this is not a chatsvc conversation file (format 'chatsvc.conversation',"
                                    " version 1, 2 or 3)."),
    ],
)  # fmt: skip
def test_import_refuses_a_bad_tool_field_naming_it(client, doc, detail):
    r = client.post(f"{CONV}/import", content=json.dumps(doc), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request" and r.json()["detail"].startswith(detail), r.json()["detail"]
    assert client.get(CONV).json()["conversations"] == []  # all or nothing


def test_the_valid_file_imports(client):
    r = client.post(f"{CONV}/import", json=a_file())
    assert r.status_code == 201, r.text
    shown = client.get(f"{CONV}/{r.json()['session_id']}").json()["messages"]
    assert [m["role"] for m in shown] == ["user", "assistant", "tool", "assistant"]
    assert shown[1]["steps"] == presented_steps() and shown[2]["tool_results"] == RESULTS


def test_markdown_folds_each_call_where_it_was_made_and_the_results_turn(client):
    from markdown_it import MarkdownIt

    _, aid = begin(client, "m")
    hostile = {**RESULT_1, "content": "```\n</details>\n# not a heading\n<script>x</script>"}
    steps = [STEPS[0], {**STEPS[1], "data": hostile}, *STEPS[2:]]
    finish(client, aid, ROUND_1 + ROUND_2, "tool_calls", dumps(steps), REASONING, LAST_SEQ)
    _, bid = begin(client, "m", "", parent=aid, results=dumps(RESULTS))
    finish(client, bid, "The answer is 42.")
    r = client.get(f"{CONV}/m/export?format=markdown")
    assert r.status_code == 200
    text = r.text
    order = ["Let me look.", "<details><summary>Tool: orders__find (8 ms)</summary>", '{"q": "北京"}',
             "Found it.", "<details><summary>Tool: app_lookup (answered by the app)</summary>",
             "<details><summary>Tool: orders__find (timeout, 30000 ms)</summary>", "Error:",
             "The tool took longer than 30 s.", "## Tool results", "<details><summary>Result: app_lookup</summary>",
             "42", "The answer is 42."]  # fmt: skip
    places = [text.index(part) for part in order]
    assert places == sorted(places), text
    assert "````\n```\n</details>\n# not a heading\n<script>x</script>\n````" in text  # the result, fenced as it is
    tokens = MarkdownIt("commonmark").parse(text)
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h1", "h2", "h2", "h2", "h2"]
    html = [t.content.strip() for t in tokens if t.type == "html_block"]
    assert all(h.startswith(("<details><summary>", "</details>")) for h in html), html
    assert len([h for h in html if h.startswith("<details>")]) == 1 + 3 + 1  # reasoning, three calls, one result


def test_pages_and_copies_count_the_tool_columns(client, service, monkeypatch):
    big = "x" * 300_000
    steps = [{**STEPS[0], "text": 0, "reasoning": 0}, {**STEPS[1], "text": 0, "reasoning": 0,
             "data": {**RESULT_1, "content": big}}]  # fmt: skip
    parent = None
    for n in range(5):
        _, aid = begin(client, "p", f"q{n}", parent=parent)
        finish(client, aid, "", "tool_calls" if n % 2 else "stop", dumps(steps), last_seq=LAST_SEQ)
        parent = aid
    # the store reads no message whose characters start past a page's size (1 MiB: 3.5 answers' steps)
    size = len(dumps(steps))
    assert 3 * size < chatsvc.MESSAGE_PAGE_BYTES < 4 * size
    rows = run(client, store(client).tree.messages, "", "p", 100, None, None, chatsvc.MESSAGE_PAGE_BYTES)
    assert [r["content"] for r in rows] == ["q0", "", "q1", "", "q2", "", "q3", ""]  # 4 answers: 3 before the 4th
    assert rows[0]["candidates"] == 10
    rows = run(client, store(client).tree.branch, "", "p", 100, None, chatsvc.MESSAGE_PAGE_BYTES)
    assert [r["content"] for r in rows] == ["", "q4", "", "q3", "", "q2", ""]  # newest first, the same cut
    page = client.get(f"{CONV}/p/messages?tree=true&limit=100")
    assert len(page.content) <= chatsvc.MESSAGE_PAGE_BYTES
    body = page.json()
    assert [m["content"] for m in body["messages"]] == ["q0", "", "q1", "", "q2", "", "q3"]
    assert body["next_cursor"] == body["messages"][-1]["id"]
    # copies: a chunk holds at most COPY_CHUNK_CHARS characters, tool columns included
    monkeypatch.setattr(chatsvc, "COPY_CHUNK_CHARS", 700_000)
    rows = [{"content": "", "reasoning_content": None, "tool_steps": big, "tool_results": None},
            {"content": "", "reasoning_content": None, "tool_steps": None, "tool_results": big},
            {"content": "a", "reasoning_content": "b", "tool_steps": big, "tool_results": None}]  # fmt: skip
    assert [len(chunk) for chunk in chatsvc._copy_chunks(rows)] == [2, 1]
    r = client.post(f"{CONV}/p/fork", json={"message_id": parent, "session_id": "p2"})  # written in chunks
    assert r.status_code == 201, r.text
    copied = service.rows("SELECT tool_steps FROM messages WHERE session_id = 'p2' AND tool_steps IS NOT NULL")
    assert [row["tool_steps"] for row in copied] == [dumps(steps)] * 5
