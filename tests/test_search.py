"""Search over titles and everything said: substring semantics that work for Chinese, Latin case
folded, every character literal, scoped to the owner, paged, and kept in step with every write."""

from __future__ import annotations

import pytest
from fake_dashscope import Reply

API = "/api/v1"
CONV = f"{API}/context/conversations"


def say(client, fake, session_id, message, answer="ok", headers=None):
    fake.push(Reply.answer([answer]))
    r = client.post(f"{API}/chat/{session_id}", json={"message": message}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def found(client, q, headers=None, **params):
    r = client.get(CONV, params={"q": q, **params}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def ids(result):
    return [c["session_id"] for c in result["conversations"]]


@pytest.fixture
def corpus(client, fake):
    say(client, fake, "story", "请给我讲个故事", "从前有座山，山里有座庙。")  # noqa: RUF001
    say(client, fake, "weather", "What's the Weather like in Hangzhou?", "Sunny, 25 degrees.")
    say(client, fake, "symbols", '100% of 5_000 "quoted" * NEAR (x) OR y', "ok")
    client.patch(f"{CONV}/weather", json={"title": "Trip planning"})
    return client


def test_chinese_two_and_three_character_queries(corpus):
    for q in ("故事", "讲个故", "有座山", "庙"):
        assert ids(found(corpus, q)) == ["story"], q
    match = found(corpus, "座庙")["conversations"][0]["match"]
    assert match["snippet"] == "从前有座山，山里有座庙。"  # noqa: RUF001
    answer = corpus.get(f"{CONV}/story").json()["messages"][1]
    assert match["message_id"] == answer["id"]
    assert found(corpus, "故事")["conversations"][0]["match"] == {"field": "title"}  # the first line is the title


def test_latin_text_matches_in_any_case(corpus):
    for q in ("weather", "WEATHER", "hangZhou", "sunny, 25", "at"):
        assert ids(found(corpus, q)) == ["weather"], q
    assert found(corpus, "trip")["conversations"][0]["match"] == {"field": "title"}


@pytest.mark.parametrize("q", ["%", "_", '"', "*", "NEAR", "(x)", "OR y", "100%", "5_0", '"quoted"', "\\", "'"])
def test_every_special_character_is_literal(corpus, q):
    result = found(corpus, q)
    expected = ["symbols"] if q != "\\" and q != "'" else (["weather"] if q == "'" else [])
    assert ids(result) == expected, (q, ids(result))


def test_no_match_and_bad_queries(corpus):
    assert found(corpus, "zebra") == {"conversations": [], "next_cursor": None}
    for q in ("", "   "):
        r = corpus.get(CONV, params={"q": q})
        assert r.status_code == 422 and "'q' must not be blank" in r.json()["detail"]
    r = corpus.get(CONV, params={"q": "x" * 201})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"
    r = corpus.get(CONV, params={"q": "a\x00b"})
    assert r.status_code == 422


def test_search_sees_only_the_owners_conversations(make_service, fake):
    with make_service(CHATSVC_USER_HEADER="X-User-Id").client() as client:
        alice, bob = {"X-User-Id": "alice"}, {"X-User-Id": "bob"}
        say(client, fake, "s1", "alice's secret plan", headers=alice)
        say(client, fake, "s1", "bob's ordinary plan", headers=bob)
        assert ids(found(client, "plan", alice)) == ids(found(client, "plan", bob)) == ["s1"]
        assert found(client, "secret", alice)["conversations"][0]["title"] == "alice's secret plan"
        assert ids(found(client, "secret", bob)) == []
        assert ids(found(client, "ordinary", bob)) == ["s1"]


def test_results_are_newest_first_and_paged(client, fake):
    for n in range(5):
        say(client, fake, f"c{n}", f"common word number {n}")
    page = found(client, "common word", limit=2)
    assert ids(page) == ["c4", "c3"] and page["next_cursor"]
    rest = found(client, "common word", limit=2, cursor=page["next_cursor"])
    assert ids(rest) == ["c2", "c1"]
    last = found(client, "common word", limit=2, cursor=rest["next_cursor"])
    assert ids(last) == ["c0"] and last["next_cursor"] is None
    say(client, fake, "c0", "again")  # updated: first again
    assert ids(found(client, "common word"))[0] == "c0"


def test_the_index_follows_every_write(client, fake, service):
    client.post(CONV, json={"session_id": "s1", "title": "T"})  # so that no title matches
    first = say(client, fake, "s1", "original question", "the first answer")
    say(client, fake, "s1", "second question")
    assert ids(found(client, "first answer")) == ["s1"]
    # an edit keeps the old version (it is still said, on its branch) and adds the new one
    say(client, fake, "s1", "edited question", "a new answer")
    edited = client.post(f"{API}/chat/s1", json={"message": "changed question", "edit": first["parent_id"]})
    assert edited.status_code == 200
    assert ids(found(client, "changed question")) == ids(found(client, "original question")) == ["s1"]
    # a deleted branch, a purge, a deleted conversation: gone from the results
    assert client.delete(f"{CONV}/s1/messages/{first['parent_id']}").status_code == 200
    assert ids(found(client, "original question")) == [] and ids(found(client, "changed question")) == ["s1"]
    assert client.delete(f"{CONV}/s1/context?purge=true").status_code == 200
    assert ids(found(client, "changed question")) == []
    client.post(CONV, json={"session_id": "s2", "title": "T"})
    say(client, fake, "s2", "to be deleted")
    assert client.delete(f"{CONV}/s2").status_code == 204
    assert ids(found(client, "to be deleted")) == []
    # a fork is found under its own id
    kept = say(client, fake, "s3", "forked words")
    client.post(f"{CONV}/s3/fork", json={"message_id": kept["message_id"], "session_id": "s3-fork"})
    assert sorted(ids(found(client, "forked words"))) == ["s3", "s3-fork"]
    if service.is_sqlite:  # the index holds exactly the messages that are not streaming
        indexed = service.rows("SELECT COUNT(*) AS n FROM messages_search")[0]["n"]
        assert indexed == service.rows("SELECT COUNT(*) AS n FROM messages WHERE search_id IS NOT NULL")[0]["n"]
        assert indexed == service.rows("SELECT COUNT(*) AS n FROM messages WHERE status != 'streaming'")[0]["n"]
