"""Plugin manager and registries: built-ins, entry points, allow-list, loud failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import pdcore
from pdcore import hookimpl
from pdcore.plugins import (
    BUILTIN_PLUGIN,
    PluginError,
    PluginUnavailableError,
    Registry,
    UnknownPluginError,
    build_plugin_manager,
    describe_plugins,
    get_plugin_manager,
    get_registry,
    notify,
    reset_plugin_manager,
)


@pytest.fixture(autouse=True)
def _clean_plugins(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PDCORE_PLUGINS", raising=False)
    monkeypatch.delenv("PDCORE_TRACE_HOOKS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a fake distribution the way pip would leave it: a *.dist-info directory with
    entry_points.txt, plus its modules, on a sys.path entry that importlib.metadata scans."""
    modules: list[str] = []

    def make(dist: str, entry_points: dict[str, str], sources: dict[str, str]) -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text("[pdcore]\n" + eps)
        for mod, src in sources.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
            modules.append(mod)

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for mod in modules:
        sys.modules.pop(mod, None)


PLUG_SRC = """
    from pdcore import hookimpl

    @hookimpl
    def pdcore_register_transfer_backends(register):
        register("fakex", lambda **kw: ("fakex", kw), description="a test backend")
        register("needs-lib", lambda: None, check=lambda: "somelib not installed")
"""


class Attn:
    """A test plugin offering two attention backends, one unavailable."""

    created: list[dict] = []

    @staticmethod
    @hookimpl
    def pdcore_register_attention_backends(register):
        def factory(**kwargs):
            Attn.created.append(kwargs)
            return ("triton", kwargs)

        register("triton", factory, check=lambda: "triton not installed")
        register("mine", factory, description="mine")


def test_builtins_are_registered_as_a_plugin():
    pm = build_plugin_manager(load_entry_points=False)
    assert pm.get_plugin(BUILTIN_PLUGIN) is not None
    attn = pm.registry("attention_backend").describe()
    assert [(i.name, i.plugin, i.available) for i in attn] == [("torch", BUILTIN_PLUGIN, True)]
    assert pm.registry("schedule_policy").names() == ["fcfs", "lpm"]
    assert pm.registry("transfer_backend").names() == []


def test_builtin_factories_are_lazy_and_router_stays_light():
    code = (
        "import sys, pdcore, pdcore.plugins as p\n"
        "for kind in p.KINDS: p.get_registry(kind).describe()\n"
        "p.get_registry('attention_backend').require('torch')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'pdcore.engine' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PDCORE_PLUGINS": ""})


def test_registry_create_and_describe():
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Attn, name="attn-test")
    reg = pm.registry("attention_backend")
    assert reg.names() == ["mine", "torch", "triton"]
    Attn.created.clear()
    assert reg.create("mine", page_size=16) == ("triton", {"page_size": 16})
    assert Attn.created == [{"page_size": 16}]
    by_name = {i.name: i for i in reg.describe()}
    assert by_name["mine"].plugin == "attn-test" and by_name["mine"].description == "mine"
    assert not by_name["triton"].available
    assert by_name["triton"].reason == "triton not installed"
    with pytest.raises(PluginUnavailableError, match="'triton'.*unavailable: triton not installed"):
        reg.create("triton")
    assert Attn.created == [{"page_size": 16}]  # the factory never ran for triton


def test_unknown_name_lists_installed_with_reasons():
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Attn)
    with pytest.raises(UnknownPluginError) as exc:
        pm.registry("attention_backend").create("foo")
    assert str(exc.value) == (
        "unknown attention backend 'foo'; installed: mine, torch, "
        "triton (unavailable \u2014 triton not installed)"
    )
    with pytest.raises(UnknownPluginError, match="none installed"):
        pm.registry("transfer_backend").create("mooncake")
    with pytest.raises(UnknownPluginError, match="did you mean 'torch'"):
        pm.registry("attention_backend").require("troch")


def test_check_is_lazy_cached_and_may_crash():
    calls = []

    def check():
        calls.append(1)
        raise RuntimeError("boom")

    reg: Registry[object] = Registry("transfer_backend", "transfer backend")
    reg.register("x", object, check=check, plugin="p")
    assert calls == []
    [info] = reg.describe()
    assert not info.available and "RuntimeError: boom" in (info.reason or "")
    reg.describe()
    assert calls == [1]


def test_duplicate_name_from_two_plugins_is_an_error():
    class Dup:
        @staticmethod
        @hookimpl
        def pdcore_register_attention_backends(register):
            register("torch", object)

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Dup, name="dup-plugin")
    with pytest.raises(PluginError, match="'torch' is registered twice") as exc:
        pm.registry("attention_backend")
    assert "'pdcore.builtins'" in str(exc.value) and "'dup-plugin'" in str(exc.value)
    pm.registry("schedule_policy")  # other kinds are unaffected


def test_bad_registrations_name_the_plugin():
    class Bad:
        @staticmethod
        @hookimpl
        def pdcore_register_schedule_policies(register):
            register("x", "not callable")

    class Crash:
        @staticmethod
        @hookimpl
        def pdcore_register_routing_policies(register):
            raise ImportError("no module named heavy")

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Bad, name="bad")
    pm.register(Crash, name="crash")
    with pytest.raises(PluginError, match="plugin 'bad' .* not callable"):
        pm.registry("schedule_policy")
    with pytest.raises(PluginError, match="plugin 'crash' failed in pdcore_register_routing"):
        pm.registry("routing_policy")
    with pytest.raises(ValueError, match="unknown plugin kind"):
        pm.registry("attention")


def test_misspelled_hook_fails_loudly():
    class Typo:
        @staticmethod
        @hookimpl
        def pdcore_register_attention_backend(register):  # missing "s"
            register("x", object)

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Typo, name="typo")
    with pytest.raises(PluginError) as exc:
        pm.check_pending()
    msg = str(exc.value)
    assert "plugin 'typo'" in msg and "unknown hook 'pdcore_register_attention_backend'" in msg
    assert "did you mean 'pdcore_register_attention_backends'" in msg and "PDCORE_PLUGINS" in msg
    with pytest.raises(PluginError):  # registries refuse to build past it too
        pm.registry("attention_backend")


def test_entry_point_is_discovered(make_dist):
    make_dist("pdcore-fakex", {"fakex": "pdtest_fakex"}, {"pdtest_fakex": PLUG_SRC})
    pm = build_plugin_manager(allow={"fakex"})
    reg = pm.registry("transfer_backend")
    assert reg.create("fakex", a=1) == ("fakex", {"a": 1})
    with pytest.raises(UnknownPluginError) as exc:
        reg.require("nope")
    assert "fakex, needs-lib (unavailable \u2014 somelib not installed)" in str(exc.value)
    report = describe_plugins(pm)
    [plug] = [p for p in report["plugins"] if p["name"] == "fakex"]
    assert (plug["package"], plug["version"], plug["builtin"]) == ("pdcore-fakex", "1.2.3", False)
    assert [i["name"] for i in plug["provides"]] == ["fakex", "needs-lib"]


def test_allow_list_env(make_dist, monkeypatch: pytest.MonkeyPatch):
    make_dist("pdcore-a", {"plug-a": "pdtest_a"}, {"pdtest_a": PLUG_SRC})
    make_dist("pdcore-b", {"plug-b": "pdtest_b"}, {"pdtest_b": PLUG_SRC.replace("fakex", "bx")})
    monkeypatch.setenv("PDCORE_PLUGINS", " plug-b ,not-installed")
    pm = get_plugin_manager()
    assert pm.has_plugin("plug-b") and not pm.has_plugin("plug-a")
    assert "bx" in get_registry("transfer_backend")
    assert "torch" in get_registry("attention_backend")  # built-ins always load
    monkeypatch.setenv("PDCORE_PLUGINS", "")
    reset_plugin_manager()
    assert get_registry("transfer_backend").names() == []


def test_misspelled_hook_in_entry_point_fails_at_load(make_dist):
    src = "from pdcore import hookimpl\n@hookimpl\ndef pdcore_request_finish(info): pass\n"
    make_dist("pdcore-typo", {"typo": "pdtest_typo"}, {"pdtest_typo": src})
    with pytest.raises(PluginError, match="did you mean 'pdcore_request_finished'"):
        build_plugin_manager(allow={"typo"})


def test_plugin_that_fails_to_import_is_reported_not_fatal(make_dist):
    src = "import pdtest_no_such_module\n"
    make_dist("pdcore-broken", {"broken": "pdtest_broken"}, {"pdtest_broken": src})
    pm = build_plugin_manager(allow={"broken"})
    assert "ModuleNotFoundError" in pm.load_errors["broken"]
    with pytest.raises(UnknownPluginError, match="failed to load: broken"):
        pm.registry("transfer_backend").require("broken")
    assert describe_plugins(pm)["failed"][0]["name"] == "broken"


def test_manager_is_cached_until_reset():
    pm = get_plugin_manager()
    assert get_plugin_manager() is pm
    reset_plugin_manager()
    assert get_plugin_manager() is not pm


def test_notify_isolates_failing_observers(caplog: pytest.LogCaptureFixture):
    seen = []

    class Ok:
        @staticmethod
        @hookimpl
        def pdcore_request_finished(info):
            seen.append(info)

    class Boom:
        @staticmethod
        @hookimpl
        def pdcore_request_finished(info):
            raise RuntimeError("observer bug")

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Ok, name="ok")
    pm.register(Boom, name="boom")
    notify("pdcore_request_finished", {"rid": "r1"}, pm=pm)
    assert seen == [{"rid": "r1"}]
    assert "'boom' failed in pdcore_request_finished" in caplog.text
    notify("pdcore_kv_transfer_finished", {"rid": "r1"}, pm=pm)  # no observers: no-op


def test_trace_env_logs_hook_calls(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("PDCORE_TRACE_HOOKS", "1")
    build_plugin_manager(load_entry_points=False).registry("attention_backend")
    err = capsys.readouterr().err
    assert "[pdcore hook] pdcore_register_attention_backends(register) -> pdcore.builtins" in err


def test_package_exports():
    assert pdcore.hookimpl is hookimpl
    assert pdcore.hookimpl.project_name == "pdcore"
    with pytest.raises(AttributeError):
        pdcore.NoSuchThing  # noqa: B018
    assert isinstance(pdcore, types.ModuleType) and "Engine" in pdcore.__all__


def test_engine_reports_finished_requests_to_observers(tiny_llama_dir: Path):
    seen: list[dict] = []

    class Observer:
        @staticmethod
        @hookimpl
        def pdcore_request_finished(info):
            seen.append(info)

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Observer, name="observer")
    reset_plugin_manager(pm)
    try:
        engine = pdcore.Engine(model_path=str(tiny_llama_dir), dtype="float32")
        engine.generate(["a b c", "d e"], {"max_new_tokens": 3, "ignore_eos": True})
    finally:
        reset_plugin_manager()
    assert sorted(i["completion_tokens"] for i in seen) == [3, 3]
    info = seen[0]
    assert info["finish_reason"] == {"type": "length", "length": 3}
    assert info["disaggregation_mode"] == "null" and info["e2e_latency_s"] > 0
    assert info["rid"].startswith("offline-") and info["prompt_tokens"] > 0
