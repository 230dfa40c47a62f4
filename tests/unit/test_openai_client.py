"""omni_attribute.openai_client against the oracle judge on 127.0.0.1: concurrency bound, Retry-After, retries
exhausted, and the replies it cannot use."""

from __future__ import annotations

import asyncio
import email.utils
import io
import time

import pytest
from PIL import Image

from omni_attribute.evaluation.judge import NATURALNESS, parse_score
from omni_attribute.openai_client import (BadResponseError, ChatClient, ChatSettings, RetriesExhaustedError,
                                          retry_after_seconds, user_message)
from tests.fixtures.oracle_judge import OracleJudge

def flat_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = flat_png()


def ask(judge: OracleJudge, count: int, **settings) -> tuple[list[str], dict]:
    async def run():
        async with ChatClient(ChatSettings(base_url=judge.url, model="oracle-judge", api_key_env=None,
                                           backoff_base=0.05, **settings)) as client:
            replies = await asyncio.gather(*(client.chat([user_message(NATURALNESS, images=[PNG])])
                                             for _ in range(count)))
            return replies, client.stats
    return asyncio.run(run())


def test_concurrency_is_bounded_and_replies_are_read():
    with OracleJudge(delay_s=0.1) as judge:
        replies, stats = ask(judge, 8, concurrency=3)
        assert judge.max_in_flight == 3 and stats.requests == 8
        assert [parse_score(r) for r in replies] == [0.0] * 8  # a flat grey image: no spread, naturalness 0


def test_retry_after_and_exhausted_retries():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_seconds(date) <= 30
    with OracleJudge(faults=["429:1"]) as judge:
        started = time.monotonic()
        ask(judge, 1, concurrency=1)
        assert time.monotonic() - started >= 0.95 and [r["status"] for r in judge.log] == [429, 200]
    with OracleJudge(faults=["503"] * 5) as judge:
        with pytest.raises(RetriesExhaustedError, match=r"no answer after 3 attempts \(last: HTTP 503: server error\)"):
            ask(judge, 1, concurrency=1, max_retries=2)
        assert len(judge.log) == 3


def test_unusable_replies_are_named():
    with pytest.raises(BadResponseError, match="no 'Score: N' with N in 0..10"):
        parse_score("It looks great, eleven out of ten.")
    assert parse_score("Reasoning...\nScore: 7") == 0.7 and parse_score("**Score:** 10") == 1.0
    assert parse_score("8/10") == 0.8
    with pytest.raises(BadResponseError):
        parse_score("Score: 12")
