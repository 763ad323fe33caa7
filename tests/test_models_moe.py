"""The model registry and the MoE families (DeepseekV3: MLA + grouped routing; Qwen3-MoE):
tiny random-weight models built and saved by transformers, greedy tokens compared with
transformers' generate (fp32) offline and through real `pdcore serve` processes."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pdcore.model import registry
from pdcore.model.kv_pool import KVPool, MLAKVPool
from pdcore.model.loader import ModelNotFoundError, load_state_dict, resolve_model
from pdcore.model.moe import Experts, SwiGLU, grouped_topk
from pdcore.offline import Engine
from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model
from tests.server_helpers import ServerProcess
from tests.tiny_models import build_tiny_deepseek_v3

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dirs(deepseek_dir: Path, qwen3_moe_dir: Path) -> dict[str, Path]:
    return {"DeepseekV3ForCausalLM": deepseek_dir, "Qwen3MoeForCausalLM": qwen3_moe_dir}


# --- registry and loading -------------------------------------------------------------------


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError) as info:
        registry.config_from_hf(tmp_path / "config.json")
    msg = str(info.value)
    assert "'MambaForCausalLM'" in msg
    for arch in ("DeepseekV3ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in msg
    # refused at flag parsing, before any weight is read
    from pdcore.settings import parse_serve_args

    with pytest.raises(SystemExit):
        parse_serve_args(["--model-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--model-path" in err and "MambaForCausalLM" in err and "Qwen3MoeForCausalLM" in err


def test_moe_families_take_tp_and_pd_flags(deepseek_dir: Path) -> None:
    # TP/EP runs in tests/test_moe_parallel.py, PD of the MLA cache in tests/test_pd_mla.py
    from pdcore.settings import parse_serve_args

    for extra in (["--tp-size", "2"], ["--disaggregation-mode", "prefill"]):
        parse_serve_args(["--model-path", str(deepseek_dir), *extra])


def test_registry_picks_the_family_and_layout(model_dirs: dict[str, Path], tiny_llama_dir) -> None:
    for arch, folder in {**model_dirs, "LlamaForCausalLM": tiny_llama_dir}.items():
        family = registry.family_for(resolve_model(str(folder)).config)
        assert family.architecture == arch
    ds = resolve_model(str(model_dirs["DeepseekV3ForCausalLM"])).config
    assert registry.family_for(ds).attention == "mla"
    pool = registry.make_kv_pool(ds, 3, 4, torch.float32, torch.device("cpu"))
    assert isinstance(pool, MLAKVPool) and pool.layout == "mla" and len(pool.buffers()) == 1
    # one "head" per token per layer: kv_lora_rank 32 + rope 16 values, not heads x (k + v)
    assert pool.page_bytes_per_layer == 4 * (32 + 16) * 4
    assert registry.kv_bytes_per_token(ds, torch.float32) == 3 * (32 + 16) * 4
    qw = resolve_model(str(model_dirs["Qwen3MoeForCausalLM"])).config
    mha = registry.make_kv_pool(qw, 3, 4, torch.float32, torch.device("cpu"))
    assert type(mha) is KVPool and len(mha.buffers()) == 2


def test_sharded_folder_loads_through_its_index(deepseek_dir: Path, tmp_path: Path) -> None:
    index = json.loads((deepseek_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # the fixture really is sharded
    state = load_state_dict(resolve_model(str(deepseek_dir)))
    assert set(state) == set(index["weight_map"])
    broken = tmp_path / "broken"
    shutil.copytree(deepseek_dir, broken)
    (broken / shards[-1]).unlink()
    with pytest.raises(ModelNotFoundError, match="missing"):
        load_state_dict(resolve_model(str(broken)))


# --- MoE pieces -----------------------------------------------------------------------------


def test_grouped_experts_equal_a_per_token_loop() -> None:
    torch.manual_seed(0)
    experts = Experts([SwiGLU(torch.randn(16, 8), torch.randn(8, 8)) for _ in range(8)])
    x = torch.randn(5, 8)
    logits = torch.randn(5, 8)
    ids, weights = grouped_topk(logits, torch.randn(8) * 0.1, 3, 4, 2, True, 2.5)
    # grouped routing keeps at most topk_group groups of 2 experts
    assert all(len({int(e) // 2 for e in row}) <= 2 for row in ids)
    want = torch.stack(
        [
            sum(weights[t, j] * experts.experts[int(ids[t, j])](x[t : t + 1])[0] for j in range(3))
            for t in range(5)
        ]
    )
    torch.testing.assert_close(experts(x, ids, weights), want)


# --- greedy parity, offline -----------------------------------------------------------------


def _offline_check(folder: Path, **engine_kwargs) -> None:
    engine = Engine(model_path=str(folder), dtype="float32", max_total_tokens=4096, **engine_kwargs)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS}
    )
    want = hf_greedy(load_hf_model(str(folder)), ids, MAX_TOKENS, engine.core.eos_ids)
    assert sum(map(len, want)) > 4 * len(PROMPTS)  # not a vacuous pass
    for prompt, out, ref in zip(PROMPTS, outs, want):
        assert out["output_ids"] == ref, f"prompt {prompt!r} diverged"


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_offline_greedy_equals_transformers(model_dirs: dict[str, Path], arch: str) -> None:
    # chunked prefill of 8 tokens on pages of 4: extends with a prefix read from the pool
    _offline_check(model_dirs[arch], page_size=4, chunked_prefill_size=8)


def test_deepseek_without_q_lora_equals_transformers(tmp_path: Path) -> None:
    # q_lora_rank None (V2-Lite style q_proj), plain RoPE (no YaRN), no interleave
    folder = build_tiny_deepseek_v3(
        tmp_path, seed=7, q_lora_rank=None, rope_parameters=None, rope_interleave=False
    )
    _offline_check(folder, page_size=16)


def test_deepseek_prefix_cache_hit_gives_same_tokens(deepseek_dir: Path) -> None:
    engine = Engine(model_path=str(deepseek_dir), dtype="float32", page_size=4)
    params = {"temperature": 0, "max_new_tokens": 8}
    first = engine.generate(PROMPTS[6], params)
    second = engine.generate(PROMPTS[6], params)
    assert second["meta_info"]["cached_tokens"] > 0
    assert first["output_ids"] == second["output_ids"]


# --- greedy parity, through `pdcore serve` --------------------------------------------------


@pytest.fixture(scope="module", params=["DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"])
def moe_server(request, model_dirs: dict[str, Path], tmp_path_factory):
    folder = model_dirs[request.param]
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(folder, log)
    try:
        server.wait_ready(600)  # generous: these machines are often shared
        yield request.param, folder, server
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_served_moe_model_matches_transformers(moe_server) -> None:
    """8 prompts at once through the official openai client, plain and streamed, and
    /generate's ids, equal transformers' greedy tokens."""
    from pdcore.model.tokenizer import load_tokenizer

    arch, folder, server = moe_server
    info = httpx.get(server.url + "/server_info", timeout=10).json()
    assert info["architecture"] == arch and info["moe"] is True
    assert info["attention"] == ("mla" if arch.startswith("Deepseek") else "mha")
    tok = load_tokenizer(str(folder))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=300)

    def complete(prompt: str, stream: bool) -> str:
        kwargs = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        if not stream:
            return client.completions.create(**kwargs).choices[0].text
        chunks = client.completions.create(stream=True, **kwargs)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def generate(prompt: str) -> list[int]:
        body = {
            "input_ids": tok.encode(prompt),
            "sampling_params": {"temperature": 0, "max_new_tokens": MAX_TOKENS},
        }
        return httpx.post(server.url + "/generate", json=body, timeout=300).json()["output_ids"]

    with ThreadPoolExecutor(3 * len(PROMPTS)) as pool:
        plain = [pool.submit(complete, p, False) for p in PROMPTS]
        streamed = [pool.submit(complete, p, True) for p in PROMPTS]
        ids = [pool.submit(generate, p) for p in PROMPTS]
        got = [[f.result() for f in fs] for fs in (plain, streamed, ids)]
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    want = hf_greedy(load_hf_model(str(folder)), prompt_ids, MAX_TOKENS, [tok.eos_token_id])
    for i, ref in enumerate(want):
        assert got[2][i] == ref, f"prompt {i} (/generate ids)"
        # random weights can end on half a UTF-8 character: the server holds it back
        text = tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")
        assert got[0][i] == text, f"prompt {i} (not streamed)"
        assert got[1][i] == text, f"prompt {i} (streamed)"
    assert httpx.get(server.url + "/get_load", timeout=10).json()[0]["num_reqs"] == 0
