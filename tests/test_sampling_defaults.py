"""--sampling-defaults model|openai: a request's unset sampling fields take the model's own
values (generation_config.json, GGUF general.sampling.*, the default model's card), or the
OpenAI ones; a value the request gives always wins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from pdcore.model.generation_defaults import (
    GenerationDefaults,
    model_generation_defaults,
    sampling_defaults,
)
from pdcore.model.loader import DEFAULT_MODEL_SAMPLING
from pdcore.server.app import build_app
from pdcore.server.engine_client import RequestRejected
from pdcore.server.engine_messages import Generate
from pdcore.server.generation import ServerState
from pdcore.server.metrics import Metrics
from pdcore.server.protocol import parse_chat, parse_completion, parse_generate
from pdcore.settings import ServerSettings, parse_serve_args
from tests.server_helpers import ServerProcess

GEN_CONFIG = {
    "bos_token_id": 1,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 99,  # not a sampling default: the route's own limit rules apply
}


def _model_with_generation_config(src: Path, dest: Path, gen: dict[str, Any]) -> Path:
    """A copy of `src` (files symlinked) whose generation_config.json is `gen`."""
    dest.mkdir()
    for f in src.iterdir():
        if f.name != "generation_config.json":
            (dest / f.name).symlink_to(f)
    (dest / "generation_config.json").write_text(json.dumps(gen))
    return dest


@pytest.fixture
def gen_model(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return _model_with_generation_config(tiny_llama_dir, tmp_path / "tiny-gen", GEN_CONFIG)


# --- reading the model's defaults ------------------------------------------------------


def test_generation_config_keys_the_file_sets(gen_model: Path) -> None:
    d = model_generation_defaults(str(gen_model))
    assert d.params == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    assert d.source == str(gen_model / "generation_config.json")


def test_save_pretrained_config_without_sampling_keys_gives_none(tiny_llama_dir: Path) -> None:
    # transformers writes bos/eos only; its class defaults (top_k=50, ...) are not the model's.
    assert (tiny_llama_dir / "generation_config.json").exists()
    assert model_generation_defaults(str(tiny_llama_dir)).params == {}


def test_bad_values_are_skipped_and_top_k_zero_means_off(tiny_llama_dir, tmp_path) -> None:
    gen = {"temperature": -1, "top_p": 0.0, "top_k": 0, "min_p": 0.05, "repetition_penalty": "x"}
    folder = _model_with_generation_config(tiny_llama_dir, tmp_path / "m", gen)
    assert model_generation_defaults(str(folder)).params == {"top_k": -1, "min_p": 0.05}


def test_default_model_uses_its_model_card_values() -> None:
    d = model_generation_defaults(None)
    assert d.params == DEFAULT_MODEL_SAMPLING == {"temperature": 0.2, "top_p": 0.9}
    assert "model card" in d.source


def test_gguf_sampling_metadata(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")  # skipped on the way: strings, arrays, bools
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
    writer.add_bool("general.flag", True)
    writer.add_float32("general.sampling.temp", 0.7)
    writer.add_float32("general.sampling.top_p", 0.8)
    writer.add_int32("general.sampling.top_k", 40)
    writer.add_float32("general.sampling.penalty_repeat", 1.1)
    writer.add_uint64("general.sampling.penalty_last_n", 64)  # not one we read
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    d = model_generation_defaults(str(path))
    assert d.params == pytest.approx(
        {"temperature": 0.7, "top_p": 0.8, "top_k": 40, "repetition_penalty": 1.1}
    )
    assert "general.sampling" in d.source
    reader_view = {  # gguf's own reader agrees with our header-only one
        k: v.contents() for k, v in gguf.GGUFReader(str(path)).fields.items() if "sampling" in k
    }
    assert reader_view["general.sampling.top_k"] == 40


def test_openai_mode_reads_nothing(gen_model: Path) -> None:
    assert sampling_defaults("openai", str(gen_model)).params == {}
    assert sampling_defaults("model", str(gen_model)).params["temperature"] == 0.6


def test_flag_parses_and_refuses_other_values(capsys) -> None:
    assert parse_serve_args([]).sampling_defaults == "model"
    assert parse_serve_args(["--sampling-defaults", "openai"]).sampling_defaults == "openai"
    with pytest.raises(SystemExit):
        parse_serve_args(["--sampling-defaults", "hf"])
    assert "sampling" in capsys.readouterr().err


# --- applying them to requests -----------------------------------------------------------

DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_unset_fields_take_the_defaults_on_every_route() -> None:
    gen = parse_generate({"text": "hi"}, DEFAULTS).sampling_params[0]
    comp = parse_completion({"prompt": "hi"}, DEFAULTS).sampling
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, DEFAULTS).sampling
    for sp in (gen, comp, chat):
        assert (sp["temperature"], sp["top_p"], sp["top_k"]) == (0.6, 0.95, 20)
        assert sp["min_p"] == 0.0 and sp["repetition_penalty"] == 1.0  # not in DEFAULTS


def test_request_values_win_including_greedy_and_null() -> None:
    sp = parse_generate(
        {"text": "hi", "sampling_params": {"temperature": 0, "top_k": None}}, DEFAULTS
    ).sampling_params[0]
    assert (sp["temperature"], sp["top_k"], sp["top_p"]) == (0.0, 20, 0.95)  # null = unset
    sp = parse_chat(
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 1.3, "top_p": 1.0},
        DEFAULTS,
    ).sampling
    assert (sp["temperature"], sp["top_p"]) == (1.3, 1.0)


def test_without_defaults_the_openai_values_apply() -> None:
    sp = parse_chat({"messages": [{"role": "user", "content": "hi"}]}).sampling
    assert (sp["temperature"], sp["top_p"], sp["top_k"]) == (1.0, 1.0, -1)


class _RecordingClient:
    """Records what the routes would send the engine, then refuses it (a 400)."""

    alive = True

    def __init__(self) -> None:
        self.jobs: list[Generate] = []

    def submit(self, jobs: list[Generate]) -> Any:
        self.jobs.extend(jobs)
        raise RequestRejected("recorded")

    async def control(self, op: str, timeout: float = 10.0) -> Any:
        return {}

    def live_rids(self) -> list[str]:
        return []


class _Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _app(mode: str, model: Path) -> tuple[TestClient, _RecordingClient]:
    settings = ServerSettings(model_path=str(model), sampling_defaults=mode)
    client = _RecordingClient()
    state = ServerState(
        settings=settings,
        client=client,  # type: ignore[arg-type]
        tokenizer=_Tokenizer(),
        model_name="m",
        max_context_len=64,
        engine_info={},
        metrics=Metrics("m"),
        vocab_size=100,
        sampling_defaults=sampling_defaults(mode, settings.model_path),
    )
    return TestClient(build_app(state), raise_server_exceptions=False), client


@pytest.mark.parametrize("mode", ["model", "openai"])
def test_routes_send_the_engine_the_effective_defaults(mode: str, gen_model: Path) -> None:
    http, client = _app(mode, gen_model)
    with http:
        assert http.post("/generate", json={"input_ids": [1, 2, 3]}).status_code == 400
        assert http.post("/v1/completions", json={"prompt": [1, 2, 3]}).status_code == 400
        body = {"input_ids": [1, 2], "sampling_params": {"temperature": 0.0}}
        assert http.post("/generate", json=body).status_code == 400
        info = http.get("/server_info").json()
    temps = [job.sampling_params["temperature"] for job in client.jobs]  # type: ignore[index]
    want = 0.6 if mode == "model" else 1.0
    assert temps == [want, want, 0.0]
    assert info["sampling_defaults"] == mode
    assert info["default_sampling_params"] == {
        "temperature": want,
        "top_p": 0.95 if mode == "model" else 1.0,
        "top_k": 20 if mode == "model" else -1,
        "min_p": 0.0,
        "repetition_penalty": 1.05 if mode == "model" else 1.0,
    }
    assert ("generation_config.json" in info["default_sampling_params_source"]) == (mode == "model")


def test_server_state_defaults_to_no_defaults() -> None:
    assert GenerationDefaults().params == {}


@pytest.mark.slow
def test_real_server_applies_the_model_defaults(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A real `pdcore serve` on a model whose generation_config asks for top_k=1 (greedy):
    a request without sampling fields then returns the temperature-0 tokens; /server_info
    shows the effective defaults."""
    model = _model_with_generation_config(
        tiny_llama_dir, tmp_path / "greedy", {"temperature": 0.9, "top_k": 1}
    )
    server = ServerProcess(model, tmp_path / "server.log")
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/server_info").json()
        ids = [1, 42, 7, 99, 3]
        outs = []
        for sp in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "temperature": 0}):
            r = httpx.post(server.url + "/generate", json={"input_ids": ids, "sampling_params": sp})
            assert r.status_code == 200, r.text
            outs.append(r.json()["output_ids"])
    finally:
        server.stop()
    assert info["default_sampling_params"]["top_k"] == 1
    assert info["default_sampling_params"]["temperature"] == 0.9
    assert outs[0] == outs[1] and len(outs[0]) == 12
