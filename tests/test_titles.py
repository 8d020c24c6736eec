"""Titles written by the model (CHATSVC_TITLES=model): after a conversation's first answer, in
the background, cleaned, never over a client's title; asserted on the request the fake DashScope
receives and on the stored conversation."""

from __future__ import annotations

import threading

import pytest
from fake_dashscope import Reply
from support import wait_for

import chatsvc

API = "/api/v1"
CONV = f"{API}/context/conversations"
TITLE_USAGE = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}


@pytest.fixture
def titled(make_service):
    service = make_service(CHATSVC_TITLES="model", CHATSVC_TITLE_MODEL="qwen-flash")
    with service.client() as client:
        yield service, client


def title_of(client, session_id="s1"):
    return client.get(f"{CONV}/{session_id}").json()


def wait_for_title_request(fake, n=2):
    return wait_for(lambda: len(fake.requests) >= n and fake.requests[n - 1])


def test_the_first_answer_is_followed_by_a_title_request(titled, fake):
    _, client = titled
    fake.push(Reply.answer(["Once upon a time"]), Reply.answer(['**"A Story', ' of Old".**'], usage=TITLE_USAGE))
    r = client.post(f"{API}/chat/s1", json={"message": "Tell me a story\nabout the sea"})
    assert r.status_code == 200 and r.json()["response"] == "Once upon a time"
    seen = wait_for_title_request(fake)
    assert seen.body["model"] == "qwen-flash"
    assert seen.body["enable_thinking"] is False and seen.body["max_tokens"] <= 64 and seen.body["stream"] is True
    assert seen.body["messages"][0] == {"role": "system", "content": chatsvc.TITLE_PROMPT}
    assert "Tell me a story" in seen.body["messages"][1]["content"]
    assert "Once upon a time" in seen.body["messages"][1]["content"]
    conv = wait_for(lambda: (c := title_of(client))["title"] == "A Story of Old" and c)
    assert conv["title_usage"] == TITLE_USAGE
    # only the first answer: the second turn asks for no title
    fake.push(Reply.answer(["more"]))
    client.post(f"{API}/chat/s1", json={"message": "more"})
    assert len(fake.requests) == 3 and title_of(client)["title"] == "A Story of Old"


def test_a_chinese_conversation_gets_the_chinese_title_the_model_wrote(titled, fake):
    _, client = titled
    fake.push(Reply.answer(["从前有座山"]), Reply.answer(["<think>想一想</think>标题：「山中的故事」。"]))  # noqa: RUF001
    client.post(f"{API}/chat/s1", json={"message": "请给我讲个故事"})
    assert title_of(client)["title"] in ("请给我讲个故事", "山中的故事")  # first line until the model's lands
    wait_for(lambda: title_of(client)["title"] == "山中的故事")


@pytest.mark.parametrize(
    "written, title",
    [
        ("Ocean Tales", "Ocean Tales"),
        ("  # Ocean *Tales*  \n\nsecond line", "Ocean Tales"),
        ('"Ocean Tales."', "Ocean Tales"),
        ("Title: Ocean Tales!", "Ocean Tales"),
        ("<think>\nlet me see\n</think>\n\n《大海的故事》", "大海的故事"),
        ("x" * 100, "x" * 60),
        ("<think>never closed", None),
        ("  \n ", None),
        ("“...”", None),
        ("**Ocean Tales**", "Ocean Tales"),
        ("_Ocean Tales_", "Ocean Tales"),
        ("`clean_title` explained", "clean_title explained"),
        ("~~Old~~ New Tales", "Old New Tales"),
        ("Renaming my_var", "Renaming my_var"),
        ("Why 2*3 is 6", "Why 2*3 is 6"),
        ("Why 2 * 3 is 6", "Why 2 * 3 is 6"),
        ("**snake_case_name** in Python", "snake_case_name in Python"),
        ("__init__ methods", "init methods"),
        ("Ocean\tTales\x07\x1b[31m", "Ocean Tales [31m"),
        ("Ocean\x85Tales", "Ocean"),  # NEL ends a line
        ("Ocean\u0090Tales\u009b", "Ocean Tales"),
        ("\u202eslaT naecO\u202c", "slaT naecO"),
        ("Ocean\u2066 Tales\u2069\u200e\u200f\u061c", "Ocean Tales"),
        ("\ufeff\u200bOcean\u2060 Tales", "Ocean Tales"),
        ("👩\u200d💻 مى\u200cخواهم", "👩\u200d💻 مى\u200cخواهم"),  # joiners stay  # noqa: RUF001
    ],
)
def test_titles_are_cleaned(written, title):
    assert chatsvc.clean_title(written) == title


def test_a_failed_or_empty_title_leaves_the_first_line(titled, fake):
    _, client = titled
    fake.push(Reply.answer(["ok"]), Reply.error(400, "invalid_parameter_error", "bad"))
    client.post(f"{API}/chat/s1", json={"message": "What is the weather?"})
    wait_for_title_request(fake)
    fake.push(Reply.answer(["ok"]), Reply.answer(["  "], usage=TITLE_USAGE))
    client.post(f"{API}/chat/s2", json={"message": "Second question"})
    wait_for_title_request(fake, 4)
    wait_for(lambda: title_of(client, "s2")["title_usage"] == TITLE_USAGE)  # the tokens spent are kept
    assert title_of(client)["title"] == "What is the weather?" and title_of(client)["title_usage"] is None
    assert title_of(client, "s2")["title"] == "Second question"


def test_a_title_a_client_set_is_never_replaced(titled, fake, caplog):
    _, client = titled
    client.post(CONV, json={"session_id": "named", "title": "Mine"})
    fake.push(Reply.answer(["ok"]))
    client.post(f"{API}/chat/named", json={"message": "hello"})
    assert len(fake.requests) == 1 and title_of(client, "named")["title"] == "Mine"
    # a PATCH while the title request is on its way wins over it
    fake.push(Reply.answer(["ok"]), Reply.answer(["Model Title"], pause=0.5))
    client.post(f"{API}/chat/s1", json={"message": "hello"})
    wait_for_title_request(fake, 3)
    client.patch(f"{CONV}/s1", json={"title": "Client Title"})
    wait_for(lambda: "title session=s1" in caplog.text)  # the model's answer has come, and was not stored
    assert "status=kept" in caplog.text
    assert title_of(client)["title"] == "Client Title" and title_of(client)["title_usage"] is None


def test_the_title_request_never_holds_the_conversation(titled, fake):
    _, client = titled
    fake.push(Reply.answer(["ok"]), Reply.answer(["Slow Title"], pause=0.5))
    client.post(f"{API}/chat/s1", json={"message": "first"})
    wait_for_title_request(fake)
    fake.push(Reply.answer(["second answer"]))
    r = client.post(f"{API}/chat/s1", json={"message": "second"})  # while the title request runs
    assert r.status_code == 200 and r.json()["response"] == "second answer"
    wait_for(lambda: title_of(client)["title"] == "Slow Title")


@pytest.mark.parametrize("gone", ["conversation", "answer", "purged"])
def test_a_title_never_outlives_the_answer_it_was_made_from(titled, fake, caplog, gone):
    """The model's title of a deleted answer is never stored: not on the conversation made again
    under the same id (whose own title comes later), nor on the conversation that lost the answer."""
    _, client = titled
    late, later = threading.Event(), threading.Event()
    fake.push(Reply.answer(["Step one: tell nobody"]), Reply.answer(["The Secret Plan"], usage=TITLE_USAGE, hold=late))
    first = client.post(f"{API}/chat/s1", json={"message": "our secret plan"}).json()
    wait_for_title_request(fake)  # the title request is on its way, its reply held
    if gone == "conversation":
        assert client.delete(f"{CONV}/s1").status_code == 204
        fake.push(Reply.answer(["Milk, eggs"]), Reply.answer(["Shopping List"], hold=later))
        client.post(f"{API}/chat/s1", json={"message": "shopping list"})
        wait_for_title_request(fake, 4)
        expected = "shopping list"
    elif gone == "answer":
        assert client.delete(f"{CONV}/s1/messages/{first['message_id']}").status_code == 200
        expected = "our secret plan"  # the first-line title, of the question that stays
    else:
        assert client.delete(f"{CONV}/s1/context?purge=true").status_code == 200
        expected = "our secret plan"
    late.set()
    logged = f"title session=s1 message={first['message_id']}"
    line = wait_for(lambda: next((line for line in caplog.text.splitlines() if logged in line), None))
    assert "status=gone" in line, line
    conv = title_of(client)
    assert conv["title"] == expected and conv["title_usage"] is None
    if gone == "conversation":  # the new conversation's own title still comes
        later.set()
        wait_for(lambda: title_of(client)["title"] == "Shopping List")


@pytest.mark.parametrize("mode, title", [("first-line", "first line only"), ("off", None)])
def test_other_title_modes(make_service, fake, mode, title):
    with make_service(CHATSVC_TITLES=mode).client() as client:
        client.post(f"{API}/chat/s1", json={"message": "first line only\nsecond"})
        assert len(fake.requests) == 1 and title_of(client)["title"] == title


def test_a_bad_titles_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="CHATSVC_TITLES='sometimes': CHATSVC_TITLES must be one of model"):
        chatsvc.Settings.from_env({"CHATSVC_TITLES": "sometimes"}, env_file=None)
