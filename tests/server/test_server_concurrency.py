"""Continuous batching through HTTP: 16 simultaneous streaming clients (official async client) get exactly the
answers they get alone; a client that disconnects mid-stream frees its slot at once (seen in /metrics)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from serving import (
    one_torch_thread,  # noqa: F401 (a fixture)
    smollm2,
    start_server,
    tiny,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 2 + 2?", "Who wrote Hamlet?",
    "Say hello in Spanish.", "What is the largest planet?", "What do bees make?", "How many days are in a week?",
    "What color is the sky?", "What is water made of?", "Name a fruit that is yellow.", "What is the opposite of hot?",
    "Which animal says moo?", "What is the freezing point of water?", "Name a musical instrument.",
    "What language is spoken in Brazil?",
]
MAX_TOKENS = 8


async def _stream_all(base_url: str, questions: list[str]) -> list[tuple[str, str, int]]:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    async def one(q: str) -> tuple[str, str, int]:
        stream = await client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True})
        text, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return "".join(text), finish, usage

    try:
        return await asyncio.gather(*(one(q) for q in questions))
    finally:
        await client.close()


@pytest.mark.slow
def test_sixteen_simultaneous_streams_equal_their_single_request_answers():
    llm = smollm2()
    s = start_server(llm, max_concurrency=16, max_queue=0, max_model_len=512)
    try:
        peak = {"running": 0}
        done = threading.Event()

        def watch() -> None:  # the batch really holds many sequences at once
            while not done.is_set():
                peak["running"] = max(peak["running"], s.engine.stats().running)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results = asyncio.run(_stream_all(s.base_url, QUESTIONS))
        done.set()
        watcher.join()
        steps = s.engine.stats().decode_steps
    finally:
        s.close()
    total = 0
    for q, (text, finish, usage) in zip(QUESTIONS, results, strict=True):
        ref = llm.generate(llm.apply_chat_template([{"role": "user", "content": q}]), max_tokens=MAX_TOKENS)
        assert (text, finish, usage) == (ref.text, ref.finish_reason, len(ref.tokens)), q
        total += usage
    assert len({text for text, _, _ in results}) == len(QUESTIONS)  # independent answers
    assert peak["running"] >= 8
    assert steps < total / 3  # tokens of many sequences per decode step


def test_a_client_disconnecting_mid_stream_frees_its_slot():
    s = start_server(tiny(), max_concurrency=2, max_queue=0, max_model_len=4096)
    try:
        client = OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Tell me everything."}],
            max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
        got = 0
        for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got == 3:
                break
        assert s.metric("pocketllama_running_sequences") == 1
        stream.close()  # the client goes away mid-stream
        start = time.monotonic()
        assert s.wait_metric("pocketllama_running_sequences", 0, timeout=10) == 0
        freed_after = time.monotonic() - start
        generated = s.metric("pocketllama_generation_tokens_total")
        assert generated < 4000 and freed_after < 5
        time.sleep(0.3)
        assert s.metric("pocketllama_generation_tokens_total") == generated  # nothing runs for it any more
        # both slots are usable again (max_queue 0: a leaked slot would make one of these a 429)
        for _ in range(2):
            with httpx.stream("POST", s.base_url + "/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 200,
                                    "stream": True, "ignore_eos": True}) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())
        assert s.wait_metric("pocketllama_running_sequences", 0, timeout=10) == 0
        # a non-streaming request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.base_url + "/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4000,
                             "ignore_eos": True})
        assert s.wait_metric("pocketllama_running_sequences", 0, timeout=10) == 0
    finally:
        s.close()
