"""The server's prefix cache: requests sharing a system prompt prefill it once; later ones report the reused
tokens in `usage.prompt_tokens_details.cached_tokens` (plain, streamed, legacy completions) and /metrics,
and answer exactly as the library does without any cache."""

from __future__ import annotations

import pytest
from openai import OpenAI
from serving import start_server, tiny

from pocketllama.engine.prefix_cache import PrefixCache, common_prefix

SYSTEM = {"role": "system", "content": "You are the help desk of a bicycle shop. " * 12}


@pytest.fixture(scope="module")
def server():
    s = start_server(tiny(), max_concurrency=2, prefix_cache=PrefixCache(64 << 20, block_size=16))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def ask(client, question: str, **kw):
    return client.chat.completions.create(model="smollm2-135m", messages=[SYSTEM, {"role": "user", "content": question}],
                                          max_tokens=8, temperature=0, **kw)


def test_shared_system_prompt_is_prefilled_once(server, client):
    first = ask(client, "Do you repair tyres?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = ask(client, "When do you open?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    llm = tiny()
    ids = llm.apply_chat_template([SYSTEM, {"role": "user", "content": "When do you open?"}])
    before = llm.apply_chat_template([SYSTEM, {"role": "user", "content": "Do you repair tyres?"}])
    shared = common_prefix(ids, before)  # the system block and the user header
    assert second.usage.prompt_tokens == len(ids)
    assert cached == shared // 16 * 16 > 100  # every full 16-token block of the shared prefix
    llm.prompt_cache = False
    assert second.choices[0].message.content == llm.generate(ids, max_tokens=8, temperature=0).text
    assert server.metric("pocketllama_engine_prefix_cache_hit_tokens_total") >= cached
    assert server.metric("pocketllama_prefix_cache_bytes") > 0


def test_streamed_and_completion_usage_report_cached_tokens(client):
    ask(client, "Warm the cache.")
    chunks = list(ask(client, "Any helmets?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman. " * 4
    client.completions.create(model="smollm2-135m", prompt=prompt + "He", max_tokens=4, temperature=0)
    again = client.completions.create(model="smollm2-135m", prompt=prompt + "She", max_tokens=4, temperature=0,
                                      n=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 48
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
