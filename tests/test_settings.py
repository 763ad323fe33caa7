"""Settings: flags beat env vars beat defaults; errors name the flag (and env var)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

import pytest

from pdcore import hookimpl
from pdcore.plugins import build_plugin_manager, reset_plugin_manager
from pdcore.settings import (
    InvalidSettingsError,
    PdcoreSettings,
    ServerSettings,
    build_parser,
    flag_names,
    new_parser,
    parse_serve_args,
    render_settings_table,
    setting,
    settings_from_args,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch):
    for key in list(os.environ):
        if key.upper().startswith(("PDCORE_", "SGLANG_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PDCORE_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def serve_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_serve_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_defaults_match_the_interface():
    s = parse_serve_args([])
    assert s == ServerSettings()
    assert (s.host, s.port, s.dtype, s.device, s.page_size) == (
        "127.0.0.1",
        30000,
        "auto",
        "auto",
        16,
    )
    assert (s.chunked_prefill_size, s.schedule_policy, s.attention_backend) == (
        2048,
        "fcfs",
        "torch",
    )
    assert (s.log_level, s.disable_radix_cache, s.disaggregation_mode) == ("info", False, "null")
    assert s.model_path is None and s.max_running_requests is None and s.cpu_threads is None


def test_flags_beat_env_beat_defaults(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PDCORE_PORT", "8001")
    monkeypatch.setenv("PDCORE_DTYPE", "float32")
    monkeypatch.setenv("PDCORE_DISABLE_RADIX_CACHE", "true")
    s = parse_serve_args(["--port", "8002"])
    assert (s.port, s.dtype, s.disable_radix_cache) == (8002, "float32", True)
    assert parse_serve_args([]).port == 8001


def test_flag_kinds():
    s = parse_serve_args(
        ["--model", "m.gguf", "--max-running-requests", "8", "--mem-fraction-static", "0.5"]
        + ["--disable-radix-cache", "--dtype", "bfloat16", "--profile-decode"]
    )
    assert (s.model_path, s.max_running_requests, s.mem_fraction_static) == ("m.gguf", 8, 0.5)
    assert s.disable_radix_cache and s.dtype == "bfloat16" and s.profile_decode
    assert parse_serve_args(["--model-path", "dir"]).model_path == "dir"


def test_pd_side_needs_an_available_transfer_backend(capsys):
    """Checked at flag parsing (before a model loads), only for a PD side."""
    err = serve_error(["--disaggregation-mode", "prefill", "--backend", "nixl"], capsys)
    assert err.startswith("pdcore serve: error: --disaggregation-transfer-backend: ")
    assert "unknown transfer backend 'nixl'" in err
    assert parse_serve_args(["--backend", "nixl"]).disaggregation_transfer_backend == "nixl"

    class Unavailable:
        @hookimpl
        def pdcore_register_transfer_backends(self, register):
            register("offline", object, check=lambda: "its cable is unplugged")

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Unavailable(), name="unavailable-test")
    reset_plugin_manager(pm)
    err = serve_error(["--disaggregation-mode", "decode", "--backend", "offline"], capsys)
    assert "'offline'" in err and "unavailable: its cable is unplugged" in err


def test_flag_error_names_the_flag(capsys):
    assert serve_error(["--port", "99999"], capsys) == (
        "pdcore serve: error: --port: Input should be less than or equal to 65535"
    )
    assert "--mem-fraction-static: Input should be less than 1" in serve_error(
        ["--mem-fraction-static", "1"], capsys
    )
    assert "--page-size: Input should be a valid integer" in serve_error(
        ["--page-size", "big"], capsys
    )
    assert "--dtype: invalid choice: 'fp8'" in serve_error(["--dtype", "fp8"], capsys)
    assert "unrecognized arguments: --prot" in serve_error(["--prot", "1"], capsys)


def test_env_error_names_flag_and_env(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("PDCORE_MAX_TOTAL_TOKENS", "-5")
    assert serve_error([], capsys) == (
        "pdcore serve: error: --max-total-tokens (env PDCORE_MAX_TOTAL_TOKENS): "
        "Input should be greater than 0"
    )
    # A valid flag hides a bad env var, as precedence says.
    assert parse_serve_args(["--max-total-tokens", "64"]).max_total_tokens == 64


def test_plugin_names_are_checked_against_registries(monkeypatch: pytest.MonkeyPatch, capsys):
    assert serve_error(["--attention-backend", "foo"], capsys) == (
        "pdcore serve: error: --attention-backend: unknown attention backend 'foo'; "
        "installed: torch"
    )
    monkeypatch.setenv("PDCORE_SCHEDULE_POLICY", "lmp")
    err = serve_error([], capsys)
    assert "--schedule-policy (env PDCORE_SCHEDULE_POLICY): unknown schedule policy 'lmp'" in err
    assert "installed: fcfs, lpm; did you mean 'lpm'?" in err


def test_unavailable_plugin_is_refused(capsys):
    class Triton:
        @staticmethod
        @hookimpl
        def pdcore_register_attention_backends(register):
            register("triton", object, check=lambda: "triton not installed")

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Triton, name="attn-triton")
    reset_plugin_manager(pm)
    expected = (
        "--attention-backend: attention backend 'triton' (plugin 'attn-triton') is "
        "unavailable: triton not installed"
    )
    assert expected in serve_error(["--attention-backend", "triton"], capsys)


def test_help_lists_every_flag_and_env(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # so argparse does not break long env var names
    with pytest.raises(SystemExit) as exc:
        parse_serve_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in out
        assert "PDCORE_" + name.upper() in out
    assert "Port the HTTP server listens on." in out and "{auto,float32,bfloat16,float16}" in out
    assert "npu:N" in out  # --device auto|cpu|cuda|npu|npu:N (a pattern, not choices)


def test_unknown_keyword_is_refused():
    with pytest.raises(ValueError, match="prot"):
        ServerSettings(prot=1)


class Toy(PdcoreSettings):
    """Toy settings."""

    timeout: int = setting(300, "seconds", env_aliases=["SGLANG_TOY_TIMEOUT"], gt=0)
    urls: list[str] = setting([], "upstreams")
    enabled: bool = setting(True, "on by default")
    mode: Literal["a", "b"] = setting("a", "mode")


class Other(PdcoreSettings):
    """Other settings."""

    other_port: int = setting(1, "another model's field", ge=1)


def test_generic_machinery_with_several_models(monkeypatch: pytest.MonkeyPatch):
    parser = build_parser(Other, build_parser(Toy, new_parser("pdcore toy")))
    ns = parser.parse_args(["--urls", "http://a", "http://b", "--no-enabled", "--other-port", "7"])
    toy = settings_from_args(Toy, ns)
    assert (toy.urls, toy.enabled, toy.timeout) == (["http://a", "http://b"], False, 300)
    assert settings_from_args(Other, ns).other_port == 7
    # SGLang's env name works, and the PDCORE_ name wins over it.
    monkeypatch.setenv("SGLANG_TOY_TIMEOUT", "600")
    assert settings_from_args(Toy, argparse.Namespace()).timeout == 600
    monkeypatch.setenv("PDCORE_TIMEOUT", "700")
    assert settings_from_args(Toy, argparse.Namespace()).timeout == 700
    monkeypatch.delenv("PDCORE_TIMEOUT")
    monkeypatch.setenv("SGLANG_TOY_TIMEOUT", "0")
    with pytest.raises(InvalidSettingsError, match=r"--timeout \(env SGLANG_TOY_TIMEOUT\)"):
        settings_from_args(Toy, argparse.Namespace())


def test_plugin_check_can_be_skipped():
    ns = argparse.Namespace(attention_backend="not-yet-installed")
    settings = settings_from_args(ServerSettings, ns, check_plugins=False)
    assert settings.attention_backend == "not-yet-installed"


def test_configuration_doc_is_in_step_with_the_model():
    text = DOC.read_text(encoding="utf-8")
    assert render_settings_table(ServerSettings) in text, (
        "docs/configuration.md is stale: run `python -m pdcore.settings_docs docs/configuration.md`"
    )
    for name, field in ServerSettings.model_fields.items():
        for flag in flag_names(name, field):
            assert f"`{flag}`" in text
