"""Conversations as trees: regenerate, edit and resend, continue from any answer, switch branches,
delete a branch, fork. Asserted on what the model receives (the fake DashScope's requests), what
the API presents (`parent_id`, `sibling_ids`, `current_message_id`) and the rows in the database."""

from __future__ import annotations

import threading

import pytest
from fake_dashscope import Reply
from live import LiveServer
from support import wait_for

API = "/api/v1"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONV = f"{API}/context/conversations"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


class Chat:
    """A conversation driven through the API, each answer's text named after its question."""

    def __init__(self, client, fake, session_id="s1", headers=None):
        self.client, self.fake, self.session_id, self.headers = client, fake, session_id, headers or {}

    def send(self, message=None, status=200, **body) -> dict:
        text = f"re: {message or 'again'}"
        self.fake.push(Reply.answer([text]))
        if message is not None:
            body["message"] = message
        r = self.client.post(f"{API}/chat/{self.session_id}", json=body, headers=self.headers)
        assert r.status_code == status, r.text
        return r.json()

    def seen(self) -> list[dict]:
        """The messages the model received in the last call."""
        return self.fake.requests[-1].body["messages"]

    def conversation(self) -> dict:
        r = self.client.get(f"{CONV}/{self.session_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def branch(self) -> list[str]:
        return [m["content"] for m in self.conversation()["messages"]]

    def message(self, message_id) -> dict:
        """A message from the tree listing, with its `sibling_ids` as a client derives them there: a tree
        page carries every message's `parent_id` instead (its siblings are the messages with the same one)."""
        tree = self.client.get(f"{CONV}/{self.session_id}/messages?tree=true&limit=500", headers=self.headers).json()
        (found,) = [m for m in tree["messages"] if m["id"] == message_id]
        assert "sibling_ids" not in found
        return {**found, "sibling_ids": [m["id"] for m in tree["messages"] if m["parent_id"] == found["parent_id"]]}

    def switch(self, message_id, status=200) -> dict:
        r = self.client.patch(f"{CONV}/{self.session_id}", json={"current_message_id": message_id},
                              headers=self.headers)  # fmt: skip
        assert r.status_code == status, r.text
        return r.json()


@pytest.fixture
def conv(client, fake):
    """q1 → a1 → q2 → a2."""
    chat = Chat(client, fake)
    chat.first = chat.send("q1")
    chat.second = chat.send("q2")
    return chat


def test_regenerate_answers_the_same_question_without_the_old_answer(conv):
    a2 = conv.second["message_id"]
    again = conv.send(regenerate=a2, temperature=0.5)
    assert conv.seen() == [SYSTEM, user("q1"), assistant("re: q1"), user("q2")]
    assert conv.fake.requests[-1].body["temperature"] == 0.5
    assert again["parent_id"] == conv.second["parent_id"]  # the same question, not a copy of it
    assert conv.message(again["message_id"])["sibling_ids"] == [a2, again["message_id"]]
    body = conv.conversation()
    assert body["current_message_id"] == again["message_id"]
    assert [m["content"] for m in body["messages"]] == ["q1", "re: q1", "q2", "re: again"]
    assert body["messages"][-1]["sibling_ids"] == [a2, again["message_id"]]
    assert body["message_count"] == 5  # the whole tree: nothing was replaced
    assert conv.client.get(f"{CONV}/s1/messages?tree=true").json()["messages"][3]["content"] == "re: q2"


def test_edit_of_the_first_message_starts_a_new_root(conv):
    q1 = conv.first["parent_id"]
    edited = conv.send("q1 edited", edit=q1)
    assert conv.seen() == [SYSTEM, user("q1 edited")]
    new_q1 = edited["parent_id"]
    assert conv.message(new_q1)["parent_id"] is None
    assert conv.message(new_q1)["sibling_ids"] == [q1, new_q1]
    assert conv.branch() == ["q1 edited", "re: q1 edited"]
    assert conv.conversation()["current_message_id"] == edited["message_id"]


def test_edit_of_a_middle_message_keeps_only_what_came_before_it(conv):
    conv.send("q3")
    q2 = conv.second["parent_id"]
    edited = conv.send("q2 edited", edit=q2)
    assert conv.seen() == [SYSTEM, user("q1"), assistant("re: q1"), user("q2 edited")]
    assert conv.message(edited["parent_id"])["parent_id"] == conv.first["message_id"]
    assert conv.message(edited["parent_id"])["sibling_ids"] == [q2, edited["parent_id"]]
    assert conv.branch() == ["q1", "re: q1", "q2 edited", "re: q2 edited"]


def test_continue_from_an_old_branch(conv):
    a2 = conv.second["message_id"]
    conv.send(regenerate=a2)  # the current branch is now the regeneration's
    later = conv.send("q3 after the first a2", parent_id=a2)
    assert conv.seen() == [SYSTEM, user("q1"), assistant("re: q1"), user("q2"), assistant("re: q2"),
                           user("q3 after the first a2")]  # fmt: skip
    assert conv.branch() == ["q1", "re: q1", "q2", "re: q2", "q3 after the first a2", "re: q3 after the first a2"]
    assert conv.conversation()["current_message_id"] == later["message_id"]


def test_switching_branches_then_chatting_follows_the_chosen_branch(conv):
    a2 = conv.second["message_id"]
    again = conv.send(regenerate=a2)
    body = conv.switch(a2)
    assert body["current_message_id"] == a2
    assert conv.branch() == ["q1", "re: q1", "q2", "re: q2"]
    conv.send("q3")
    assert conv.seen() == [SYSTEM, user("q1"), assistant("re: q1"), user("q2"), assistant("re: q2"), user("q3")]
    # a switch to an inner message goes down to its newest leaf, the newest child at each step:
    # q2's newest answer is the regeneration, which has no child
    assert conv.switch(conv.first["parent_id"])["current_message_id"] == again["message_id"]
    assert conv.branch() == ["q1", "re: q1", "q2", "re: again"]
    assert conv.switch(a2)["current_message_id"] == conv.conversation()["messages"][-1]["id"]
    assert conv.branch() == ["q1", "re: q1", "q2", "re: q2", "q3", "re: q3"]


def test_a_switch_follows_the_newest_child(conv):
    a2 = conv.second["message_id"]
    again = conv.send(regenerate=a2)  # q2 now has two answers; the newest is `again`
    assert conv.switch(conv.first["message_id"])["current_message_id"] == again["message_id"]


def test_context_clear_applies_to_every_branch(conv):
    a1 = conv.first["message_id"]
    assert conv.client.delete(f"{CONV}/s1/context").status_code == 200
    conv.send("q3", parent_id=a1)  # an old branch: everything on it is from before the clear
    assert conv.seen() == [SYSTEM, user("q3")]
    messages = conv.conversation()["messages"]
    assert [(m["content"], m["in_context"]) for m in messages] == [
        ("q1", False), ("re: q1", False), ("q3", True), ("re: q3", True)]  # fmt: skip
    conv.send(regenerate=conv.conversation()["current_message_id"])
    assert conv.seen() == [SYSTEM, user("q3")]


def test_purge_keeps_no_dangling_parent(conv, service):
    assert conv.client.delete(f"{CONV}/s1/context?purge=true").status_code == 200
    assert conv.conversation()["current_message_id"] is None
    fresh = conv.send("after the purge")
    assert conv.seen() == [SYSTEM, user("after the purge")]
    assert conv.message(fresh["parent_id"])["parent_id"] is None
    assert [r["content"] for r in service.rows("SELECT content FROM messages ORDER BY id")] == [
        "after the purge", "re: after the purge"]  # fmt: skip


def test_delete_of_the_current_leaf_moves_to_its_parents_newest_leaf(conv, service):
    a2 = conv.second["message_id"]
    again = conv.send(regenerate=a2)
    r = conv.client.delete(f"{CONV}/s1/messages/{again['message_id']}")
    assert r.status_code == 200, r.text
    assert r.json()["current_message_id"] == a2 and r.json()["message_count"] == 4
    assert conv.message(a2)["sibling_ids"] == [a2]
    # a user message and its answers below it
    conv.send("q3")
    q2 = conv.message(a2)["parent_id"]
    r = conv.client.delete(f"{CONV}/s1/messages/{q2}")
    assert r.json()["current_message_id"] == conv.first["message_id"]
    assert conv.branch() == ["q1", "re: q1"]
    assert [x["content"] for x in service.rows("SELECT content FROM messages ORDER BY id")] == ["q1", "re: q1"]
    # the first message: everything, and no current leaf
    r = conv.client.delete(f"{CONV}/s1/messages/{conv.first['parent_id']}")
    assert r.json()["current_message_id"] is None and r.json()["message_count"] == 0
    assert conv.send("new start")["parent_id"]
    assert conv.seen() == [SYSTEM, user("new start")]


def test_delete_of_a_root_moves_to_the_newest_other_root(conv):
    q1 = conv.first["parent_id"]
    edited = conv.send("q1 edited", edit=q1)
    conv.switch(conv.second["message_id"])
    assert conv.branch()[0] == "q1"
    r = conv.client.delete(f"{CONV}/s1/messages/{q1}")
    assert r.json()["current_message_id"] == edited["message_id"]
    assert conv.branch() == ["q1 edited", "re: q1 edited"]
    assert conv.message(edited["parent_id"])["sibling_ids"] == [edited["parent_id"]]


def test_delete_of_a_message_off_the_current_branch_keeps_the_current_leaf(conv):
    a2 = conv.second["message_id"]
    again = conv.send(regenerate=a2)
    r = conv.client.delete(f"{CONV}/s1/messages/{a2}")
    assert r.json()["current_message_id"] == again["message_id"]


def test_fork_copies_the_path_to_a_message(conv, service):
    conv.send("q3")
    a2 = conv.second["message_id"]
    r = conv.client.post(f"{CONV}/s1/fork", json={"message_id": a2, "session_id": "forked"})
    assert r.status_code == 201, r.text
    forked = r.json()
    assert forked["session_id"] == "forked" and forked["title"] == "q1" and forked["message_count"] == 4
    copy = Chat(conv.client, conv.fake, "forked")
    original = conv.conversation()["messages"][:4]
    copied = copy.conversation()["messages"]
    assert forked["current_message_id"] == copied[-1]["id"]
    same = ("role", "content", "reasoning_content", "status", "in_context", "model", "finish_reason", "usage",
            "created_at")  # fmt: skip
    assert [{k: m[k] for k in same} for m in copied] == [{k: m[k] for k in same} for m in original]
    assert not {m["id"] for m in copied} & {m["id"] for m in original}
    assert [m["parent_id"] for m in copied] == [None] + [m["id"] for m in copied[:-1]]
    copy.send("q3 in the fork")
    assert copy.seen() == [SYSTEM, user("q1"), assistant("re: q1"), user("q2"), assistant("re: q2"),
                           user("q3 in the fork")]  # fmt: skip
    assert conv.branch()[-2:] == ["q3", "re: q3"]  # the source is untouched
    # a random id and a title of its own; an existing id is 409; another conversation's message 404
    r = conv.client.post(f"{CONV}/s1/fork", json={"message_id": conv.first["parent_id"], "title": "mine"})
    assert r.status_code == 201 and r.json()["title"] == "mine" and r.json()["message_count"] == 1
    r = conv.client.post(f"{CONV}/s1/fork", json={"message_id": a2, "session_id": "forked"})
    assert r.status_code == 409 and r.json()["code"] == "conversation_exists"
    r = conv.client.post(f"{CONV}/forked/fork", json={"message_id": a2})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_fork_keeps_what_was_out_of_the_context_out(conv):
    assert conv.client.delete(f"{CONV}/s1/context").status_code == 200
    later = conv.send("q3")
    conv.client.post(f"{CONV}/s1/fork", json={"message_id": later["message_id"], "session_id": "f"})
    copy = Chat(conv.client, conv.fake, "f")
    assert [m["in_context"] for m in copy.conversation()["messages"]] == [False] * 4 + [True] * 2
    copy.send("q4")
    assert copy.seen() == [SYSTEM, user("q3"), assistant("re: q3"), user("q4")]


def test_the_tree_listing_pages_every_message_oldest_first(conv):
    conv.send(regenerate=conv.second["message_id"])
    conv.send("q1 edited", edit=conv.first["parent_id"])
    page = conv.client.get(f"{CONV}/s1/messages?tree=true&limit=3").json()
    assert [m["content"] for m in page["messages"]] == ["q1", "re: q1", "q2"]
    rest = conv.client.get(f"{CONV}/s1/messages?tree=true&limit=3&cursor={page['next_cursor']}").json()
    assert [m["content"] for m in rest["messages"]] == ["re: q2", "re: again", "q1 edited"]
    last = conv.client.get(f"{CONV}/s1/messages?tree=true&limit=3&cursor={rest['next_cursor']}").json()
    assert [m["content"] for m in last["messages"]] == ["re: q1 edited"] and last["next_cursor"] is None
    # the branch listing pages up the current branch only
    page = conv.client.get(f"{CONV}/s1/messages?limit=1").json()
    assert [m["content"] for m in page["messages"]] == ["re: q1 edited"]
    up = conv.client.get(f"{CONV}/s1/messages?limit=5&before={page['next_cursor']}").json()
    assert [m["content"] for m in up["messages"]] == ["q1 edited"] and up["next_cursor"] is None
    # in the tree, `before` bounds the page from above
    ids = [m["id"] for m in conv.client.get(f"{CONV}/s1/messages?tree=true").json()["messages"]]
    bounded = conv.client.get(f"{CONV}/s1/messages?tree=true&cursor={ids[0]}&before={ids[3]}").json()
    assert [m["id"] for m in bounded["messages"]] == ids[1:3] and bounded["next_cursor"] is None


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"message": "x", "parent_id": "A2", "edit": "Q2"}, "At most one"),
        ({"message": "x", "regenerate": "A2"}, "leave 'message' out"),
        ({"regenerate": "Q2"}, "'regenerate' must name an answer"),
        ({"message": "x", "edit": "A2"}, "'edit' must name a user message"),
        ({"message": "x", "parent_id": "Q2"}, "'parent_id' must name an answer"),
        ({"message": "x", "parent_id": 7}, "'parent_id' must be the id of a message"),
        ({"message": "x", "edit": ["Q2"]}, "'edit' must be the id of a message"),
        ({"edit": "Q2"}, "'message' is required"),
    ],
)
def test_tree_fields_are_checked(conv, service, body, detail):
    ids = {"A2": conv.second["message_id"], "Q2": conv.second["parent_id"]}
    body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    before = service.rows("SELECT COUNT(*) AS n FROM messages")
    r = conv.client.post(f"{API}/chat/s1", json=body)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request" and detail in r.json()["detail"], r.text
    assert service.rows("SELECT COUNT(*) AS n FROM messages") == before


def test_no_id_of_another_owner_or_conversation_is_accepted(make_service, fake):
    service = make_service(CHATSVC_USER_HEADER="X-User-Id")
    with service.client() as client:
        alice = Chat(client, fake, "s1", {"X-User-Id": "alice"})
        a = alice.send("alice's question")
        other = Chat(client, fake, "s2", {"X-User-Id": "alice"})
        other.send("another conversation")
        bob = Chat(client, fake, "s1", {"X-User-Id": "bob"})
        bob.send("bob's question")
        for chat in (bob, other):  # the same session id of another owner; another conversation of the owner
            for body in ({"message": "x", "parent_id": a["message_id"]}, {"message": "x", "edit": a["parent_id"]},
                         {"regenerate": a["message_id"]}):  # fmt: skip
                r = client.post(f"{API}/chat/{chat.session_id}", json=body, headers=chat.headers)
                assert r.status_code == 404 and r.json()["code"] == "not_found", (chat.session_id, body, r.text)
                assert a["message_id"] in r.json()["detail"] or a["parent_id"] in r.json()["detail"]
            assert chat.switch(a["message_id"], status=404)["code"] == "not_found"
            r = client.delete(f"{CONV}/{chat.session_id}/messages/{a['message_id']}", headers=chat.headers)
            assert r.status_code == 404
            r = client.post(f"{CONV}/{chat.session_id}/fork", json={"message_id": a["message_id"]},
                            headers=chat.headers)  # fmt: skip
            assert r.status_code == 404
        assert alice.branch() == ["alice's question", "re: alice's question"]
        assert bob.branch() == ["bob's question", "re: bob's question"]
        assert service.rows("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 6
        assert service.rows("SELECT COUNT(*) AS n FROM conversations")[0]["n"] == 3


def test_unknown_message_ids_are_404_and_bad_ones_422(conv):
    r = conv.client.post(f"{API}/chat/s1", json={"message": "x", "parent_id": "nope"})
    assert r.status_code == 404 and r.json()["detail"] == "Conversation 's1' has no message 'nope'."
    assert conv.switch("nope", status=404)["detail"] == "Conversation 's1' has no message 'nope'."
    assert conv.switch(None, status=422)["code"] == "invalid_request"
    r = conv.client.delete(f"{CONV}/s1/messages/nope")
    assert r.status_code == 404 and r.json()["detail"] == "Conversation 's1' has no message 'nope'."
    r = conv.client.delete(f"{CONV}/missing/messages/nope")
    assert r.status_code == 404 and r.json()["detail"] == "No conversation with session_id 'missing'."
    r = conv.client.post(f"{CONV}/s1/fork", json={})
    assert r.status_code == 422 and "'message_id' is required" in r.json()["detail"]
    r = conv.client.patch(f"{CONV}/missing", json={"current_message_id": "nope"})
    assert r.status_code == 404 and r.json()["detail"] == "No conversation with session_id 'missing'."


# ── a running answer, on any branch ─────────────────────────────────────────────────────


def running_answer(live, fake, chunks=200, **body):
    """A streaming answer in flight: its reader, once the answer's first chunk arrived."""
    fake.push(Reply.answer([f"w{i} " for i in range(chunks)], pause=0.02))
    reader = live.reader("POST", f"{API}/chat/s1/stream", json=body)
    events = [reader.next_event(), reader.next_event()]
    assert [e["type"] for e in events] == ["start", "chunk"]
    return reader, events[0]


@pytest.fixture
def live(service):
    with LiveServer(service.settings) as server:
        yield server


def test_a_regeneration_streams_resumes_and_stops_like_any_answer(live, fake, service):
    with live.client() as client:
        first = client.post(f"{API}/chat/s1", json={"message": "q1"}).json()
        listener = live.reader("GET", f"{API}/chat/s1/stream")
        wait_for(lambda: live.listeners("s1"))
        reader, start = running_answer(live, fake, regenerate=first["message_id"])
        assert start["data"] == {"session_id": "s1", "message_id": start["data"]["message_id"],
                                 "model": "qwen-plus", "parent_id": first["parent_id"]}  # fmt: skip
        heard = [listener.next_event() for _ in range(4)]
        assert heard[0] == start
        # another message, on any branch, waits for this answer
        for body in ({"message": "x"}, {"message": "x", "parent_id": first["message_id"]},
                     {"message": "x", "edit": first["parent_id"]}, {"regenerate": first["message_id"]}):  # fmt: skip
            r = client.post(f"{API}/chat/s1", json=body)
            assert r.status_code == 409 and r.json()["code"] == "conversation_busy", body
        r = client.delete(f"{CONV}/s1/messages/{first['parent_id']}")
        assert r.status_code == 409 and "stop it first" in r.json()["detail"]
        r = client.post(f"{CONV}/s1/fork", json={"message_id": start["data"]["message_id"]})
        assert r.status_code == 409 and r.json()["code"] == "conversation_busy"
        resumed = live.reader("GET", f"{API}/chat/s1/stream", headers={"Last-Event-ID": heard[-1]["id"]})
        stop = client.post(f"{API}/chat/s1/stop").json()
        assert stop["stopped"] is True and stop["message_id"] == start["data"]["message_id"]
        ended = reader.until_end()
        rest = resumed.until_end()
        assert rest[0]["id"] == f"{start['data']['message_id']}:4"  # the event after the one it saw
        assert heard + rest == reader.events  # no gap, no duplicate
        assert ended[-1]["data"]["finish_reason"] == "stopped"
        rows = service.rows("SELECT id, parent_id, status FROM messages WHERE role = 'assistant' ORDER BY id")
        answers = [first["message_id"], start["data"]["message_id"]]
        assert rows == [{"id": answer, "parent_id": first["parent_id"], "status": status}
                        for answer, status in zip(answers, ("complete", "stopped"), strict=True)]  # fmt: skip
        # a switch while nothing runs, then the old answer's branch takes a new message
        assert client.patch(f"{CONV}/s1", json={"current_message_id": first["message_id"]}).status_code == 200
        assert client.post(f"{API}/chat/s1", json={"message": "q2"}).json()["parent_id"]
        assert fake.requests[-1].body["messages"][1:] == [user("q1"), assistant(first["response"]), user("q2")]


def test_a_switch_during_an_answer_leaves_the_answer_where_it_is(live, fake, service):
    with live.client() as client:
        first = client.post(f"{API}/chat/s1", json={"message": "q1"}).json()
        reader, start = running_answer(live, fake, regenerate=first["message_id"])
        body = client.patch(f"{CONV}/s1", json={"current_message_id": first["message_id"]}).json()
        assert body["current_message_id"] == first["message_id"] and body["generating"] is True
        stop = threading.Thread(target=lambda: client.post(f"{API}/chat/s1/stop"))
        stop.start()
        reader.until_end()
        stop.join()  # its response comes once the answer is stored: the client must outlive it
        conv = client.get(f"{CONV}/s1").json()
        assert conv["current_message_id"] == first["message_id"]
        assert conv["messages"][-1]["sibling_ids"] == [first["message_id"], start["data"]["message_id"]]
