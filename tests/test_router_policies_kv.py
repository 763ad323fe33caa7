"""GET /kv_cache_blocks on a real `pdcore serve`, and kv_aware reading it: the router's page
hashes of a prompt (its own tokenizer and chat template) are the server's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdcore.router.policies import RouteRequest, Worker
from pdcore.router.policy_kv_aware import KvAwarePolicy
from pdcore.router.policy_tokens import PromptTokenizer, block_hashes
from tests.server_helpers import ServerProcess
from tests.test_router_helpers import clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PAGE = 16


@pytest.fixture(scope="module")
def server(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("kv") / "server.log"
    srv = ServerProcess(tiny_llama_dir, log, "--page-size", str(PAGE), env=clean_env())
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log()


def blocks(url: str) -> set[int]:
    data = httpx.get(url + "/kv_cache_blocks", timeout=10).json()
    assert data["page_size"] == PAGE and data["num_blocks"] == len(data["blocks"])
    return {int(h, 16) for h in data["blocks"]}


def generate(url: str, path: str, body: dict) -> None:
    r = httpx.post(url + path, json={**body, "max_tokens": 1, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text


def test_blocks_are_the_prompts_page_hashes(server: ServerProcess, tiny_llama_dir: Path) -> None:
    assert httpx.post(server.url + "/flush_cache", timeout=10).status_code == 200
    assert blocks(server.url) == set()
    tok = PromptTokenizer.load(tiny_llama_dir)
    ids = list(range(100, 180))
    text = "Routing by what the cache really holds. " * 8
    messages = [{"role": "user", "content": "Tell me about prefix caches, please. " * 4}]
    generate(server.url, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
    generate(server.url, "/v1/completions", {"prompt": text, "model": "x"})
    generate(server.url, "/v1/chat/completions", {"messages": messages, "model": "x"})
    held = blocks(server.url)
    for body in ({"input_ids": ids}, {"prompt": text}, {"messages": messages}):
        ids_here = tok.token_ids(body)
        assert ids_here is not None
        expected = block_hashes(ids_here, PAGE)
        assert expected and set(expected) <= held, body


def test_kv_aware_scores_the_worker_that_holds_the_prefix(
    server: ServerProcess, tiny_llama_dir: Path
) -> None:
    text = "A long shared system prompt about routers. " * 6
    generate(server.url, "/v1/completions", {"prompt": text + "first", "model": "x"})
    cold = Worker(url="http://127.0.0.1:9", role="prefill")  # nothing listens: holds nothing
    warm = Worker(url=server.url, role="prefill")
    policy = KvAwarePolicy(settings=None)

    async def poll() -> None:
        async with httpx.AsyncClient() as client:
            await policy._find_tokenizer(client, [warm])
            await asyncio.gather(policy.poll(client, cold), policy.poll(client, warm))

    asyncio.run(poll())
    assert policy.tokenizer is not None  # found through /server_info's model_folder
    body = {"prompt": text + "second", "model": "x"}
    ids = policy.tokenizer.token_ids(body)
    assert ids is not None
    cached = policy.cached_tokens(warm.url, block_hashes(ids, PAGE), 0.0)
    assert cached >= len(policy.tokenizer.encode(text)) - PAGE
    assert policy.select([cold, warm], RouteRequest(body=body, text=text)) == 1
