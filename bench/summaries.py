"""What summaries cost (issue 25, part 2): one long conversation of 100 turns against the fake
DashScope, with CHATSVC_SUMMARIES=on and off, the same messages. Reports the tokens sent to the
model (chatsvc's estimate, sent_tokens, of each request's body) for answers and for summaries, per
turn, and the number of summaries.

    python bench/summaries.py [--turns 100] [--budget 2000]

Each user message is ~60 tokens, each answer ~120, each summary ~150 (the fake's replies); the
context budget is CHATSVC_MAX_CONTEXT_TOKENS (--budget). SQLite, in process."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_dashscope import FakeDashScope, Reply
from support import Service

import chatsvc


def run(fake: FakeDashScope, summaries: str, turns: int, budget: int) -> dict:
    fake.reset()

    def reply(seen) -> Reply:
        if seen.body["messages"][0]["content"] == chatsvc.SUMMARY_PROMPT:
            return Reply.answer(["summary of facts and decisions " * 25])
        return Reply.answer(["an answer with some detail " * 24])

    fake.default = reply
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(
            f"sqlite+aiosqlite:///{tmp}/bench.db",
            fake,
            CHATSVC_SUMMARIES=summaries,
            CHATSVC_MAX_CONTEXT_TOKENS=str(budget),
            CHATSVC_MAX_CONTEXT_MESSAGES="200",
        )
        with service.client() as client:
            for turn in range(turns):
                r = client.post("/api/v1/chat/long", json={"message": f"turn {turn}: " + "tell me more about it " * 12})
                assert r.status_code == 200, r.text
                deadline = time.monotonic() + 5  # let a summary the answer started finish before the next turn
                time.sleep(0.02)
                while time.monotonic() < deadline:
                    asked = sum(s.body["messages"][0]["content"] == chatsvc.SUMMARY_PROMPT for s in fake.requests)
                    if asked == len(service.rows("SELECT 1 FROM summaries")):
                        break
                    time.sleep(0.01)
    sent = [
        (s.body["messages"][0]["content"] == chatsvc.SUMMARY_PROMPT, chatsvc.sent_tokens(s.body)) for s in fake.requests
    ]
    answer_tokens = sum(t for summary, t in sent if not summary)
    summary_tokens = sum(t for summary, t in sent if summary)
    return {
        "summaries": sum(summary for summary, _ in sent),
        "answer_tokens_per_turn": answer_tokens / turns,
        "summary_tokens_per_100_turns": summary_tokens * 100 / turns,
        "all_tokens_per_turn": (answer_tokens + summary_tokens) / turns,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--budget", type=int, default=2000)
    args = parser.parse_args()
    fake = FakeDashScope().start()
    try:
        for setting in ("off", "on"):
            print(f"CHATSVC_SUMMARIES={setting}:", run(fake, setting, args.turns, args.budget))
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
