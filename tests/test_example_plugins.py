"""The worked example of docs/plugins.md, used the way a user would use it: the package in
examples/pdcore-example-plugins is pip-installed into a temporary directory, and every
check runs in a subprocess whose PYTHONPATH holds that directory, so pdcore finds the four
plugins through the "pdcore" entry point group and nothing else. This test process never
imports the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.hf_reference import PROMPTS, hf_greedy, load_hf_model
from tests.server_helpers import sse_events
from tests.test_pd_e2e import PDDeployment, _idle_tokens

EXAMPLE = ROOT / "examples" / "pdcore-example-plugins"
ENTRY_POINT = "example"  # [project.entry-points.pdcore] example = "pdcore_example_plugins"
PACKAGE = "pdcore-example-plugins"
OFFERS = {
    "transfer_backend": "tcp",
    "attention_backend": "reference",
    "schedule_policy": "sjf",
    "routing_policy": "least_inflight",
}
MAX_NEW = 16


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Install the example (offline: no index, no build isolation, no dependencies) and
    return an environment that finds it. The source is copied first, because setuptools
    writes build/ and *.egg-info next to the sources it builds."""
    tmp = tmp_path_factory.mktemp("example-plugins")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(
        EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    pip += ["--no-build-isolation", "--target", str(site), str(src)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert list(site.glob("pdcore_example_plugins-*.dist-info/entry_points.txt"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PDCORE_", "SGLANG_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["PDCORE_PLUGINS"] = ENTRY_POINT  # only this entry point: no nixl/mooncake imports
    return env


def start_py(env: dict[str, str], code: str, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", textwrap.dedent(code), *args]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def finish_py(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    """Its stdout once it exited 0; killed if it runs past `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def run_py(env: dict[str, str], code: str, *args: str) -> str:
    return finish_py(start_py(env, code, *args))


def test_pdcore_plugins_lists_all_four(plugin_env: dict[str, str]) -> None:
    cli = [sys.executable, "-m", "pdcore.cli", "plugins"]
    text = subprocess.run(cli, capture_output=True, text=True, env=plugin_env, timeout=60)
    assert text.returncode == 0, text.stderr
    assert f"{ENTRY_POINT} ({PACKAGE} 0.1.0)" in text.stdout
    report = json.loads(
        run_py(plugin_env, "from pdcore.cli import main; main(['plugins', '--json'])")
    )
    [plugin] = [p for p in report["plugins"] if p["name"] == ENTRY_POINT]
    assert plugin["package"] == PACKAGE and not plugin["builtin"]
    offered = {item["kind"]: item["name"] for item in plugin["provides"]}
    assert offered == OFFERS
    assert all(item["available"] for item in plugin["provides"]), plugin["provides"]
    assert not report["failed"] and not report["errors"]


def test_policies_through_the_registry(plugin_env: dict[str, str]) -> None:
    run_py(
        {**plugin_env, "PDCORE_SJF_MAX_WAIT_S": "30"},
        """
        import sys, time
        from types import SimpleNamespace as R
        from pdcore.plugins import get_registry
        from pdcore.router.policies import RouteRequest, Worker

        reg = get_registry("routing_policy")
        prefill = reg.create("least_inflight", role="prefill", settings=None)
        decode = reg.create("least_inflight", role="decode", settings=None)
        p = [Worker("p0", "prefill", in_flight=2), Worker("p1", "prefill", in_flight=1),
             Worker("p2", "prefill", in_flight=1)]
        d = [Worker("d0", "decode", in_flight=3), Worker("d1", "decode", in_flight=0)]
        req = RouteRequest({}, "")
        assert (prefill.select(p, req), decode.select(d, req)) == (1, 1)
        assert (prefill.select(p[:1], req), decode.select(d[:1], req)) == (0, 0)
        assert "torch" not in sys.modules, "the plugin module must stay light for the router"

        sjf = get_registry("schedule_policy").create("sjf")
        assert sjf.max_wait_s == 30.0  # from PDCORE_SJF_MAX_WAIT_S
        now = time.monotonic()
        long_new = R(seq_len=500, arrival_time=now)
        short = R(seq_len=20, arrival_time=now - 1)
        cached = R(seq_len=400, arrival_time=now - 2)  # 390 of its tokens are cached
        long_old = R(seq_len=900, arrival_time=now - 60)  # overdue: goes first
        order = sjf.order([long_new, short, cached, long_old],
                          lambda r: 390 if r is cached else 0)
        assert order == [long_old, cached, short, long_new], order
        """,
    )


def test_tcp_passes_the_conformance_kit(plugin_env: dict[str, str]) -> None:
    kit = [sys.executable, "-m", "pdcore.testing.conformance", "tcp", "5"]
    done = subprocess.run(kit, capture_output=True, text=True, env=plugin_env, timeout=180)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "transfer backend 'tcp': conforms" in done.stdout
    assert "skipped" not in done.stdout and "FAIL" not in done.stdout


def test_tcp_receiver_refuses_writes_outside_its_memory(plugin_env: dict[str, str]) -> None:
    """What the kit cannot check: a sender holding a blob that claims more memory than the
    receiver registered (the sender's own check passes) is refused by the receiver, which
    writes nothing; the connection still works afterwards; empty runs carry a notification."""
    run_py(
        plugin_env,
        """
        import time, msgpack, numpy as np
        from pdcore.disagg.transfer import (BatchStatus, MemoryRegion, TransferConfig,
                                            create_transfer_backend)

        def wait(b):
            deadline = time.monotonic() + 20
            while not (st := tx.poll(b)).finished and time.monotonic() < deadline:
                time.sleep(0.001)
            return st

        rx = create_transfer_backend("tcp", TransferConfig(local_id="rx"))
        tx = create_transfer_backend("tcp", TransferConfig(local_id="tx", timeout_s=5))
        src = np.arange(8192, dtype=np.uint8)
        dst = np.zeros(8192, dtype=np.uint8)
        tx.register_memory([MemoryRegion(src.ctypes.data, 8192)])
        rx.register_memory([MemoryRegion(dst.ctypes.data, 4096)])  # the first half only
        blob = msgpack.unpackb(rx.describe())
        blob["regions"][0][1] = 8192  # a lie: the whole buffer
        tx.connect("liar", msgpack.packb(blob))
        st = wait(tx.submit("liar", [(src.ctypes.data, dst.ctypes.data + 4000, 200)], b"bad"))
        assert st.status is BatchStatus.FAILED and "outside" in st.reason, st
        assert not dst.any(), "the receiver wrote into memory it never registered"
        st = wait(tx.submit("liar", [(src.ctypes.data, dst.ctypes.data, 100)], b"good"))
        assert st.status is BatchStatus.DONE, st
        assert (dst[:100] == src[:100]).all() and not dst[100:].any()
        assert wait(tx.submit("liar", [], b"note only")).status is BatchStatus.DONE
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            got += [(n.sender, n.payload) for n in rx.fetch_notifications()]
        assert got == [("tx", b"good"), ("tx", b"note only")], got
        tx.close(); rx.close()
        """,
    )


ENGINE = """
import json, sys
from pdcore import Engine

engine = Engine(model_path=sys.argv[1], dtype="float32", attention_backend="reference",
                schedule_policy="sjf", page_size=4, chunked_prefill_size=8,
                max_running_requests=3, max_total_tokens=2048)
prompts = json.loads(sys.argv[2])
params = {"temperature": 0, "max_new_tokens": int(sys.argv[3])}
first = engine.generate(input_ids=prompts, sampling_params=params)
again = engine.generate(input_ids=prompts, sampling_params=params)  # prefix-cache hits
print(json.dumps({
    "first": [o["output_ids"] for o in first],
    "again": [o["output_ids"] for o in again],
    "cached": [o["meta_info"]["cached_tokens"] for o in again],
}))
"""


def test_engine_with_reference_attention_and_sjf_equals_transformers(
    plugin_env: dict[str, str], tiny_llama_dir: Path
) -> None:
    from pdcore.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    ids = [tok.encode(p) for p in PROMPTS]
    # Chunks of 8 tokens on pages of 4, at most 3 running: extends with a prefix, decode
    # batches of several lengths, and an admission order that sjf decides.
    engine = start_py(plugin_env, ENGINE, str(tiny_llama_dir), json.dumps(ids), str(MAX_NEW))
    try:  # transformers' answer meanwhile
        want = hf_greedy(load_hf_model(str(tiny_llama_dir)), ids, MAX_NEW, [tok.eos_token_id])
    except BaseException:
        engine.kill()
        engine.communicate()
        raise
    out = json.loads(finish_py(engine).splitlines()[-1])
    assert sum(map(len, want)) > 4 * len(PROMPTS)  # not a vacuous pass
    assert out["first"] == want
    assert out["again"] == want
    assert sum(out["cached"]) > 0


# --- prefill + decode over "tcp", routed by "least_inflight" ------------------------------


@pytest.fixture(scope="module")
def pd(
    plugin_env: dict[str, str], tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PDDeployment]:
    """Prefill and decode over transfer backend "tcp" (decode also runs the "reference"
    attention and "sjf"), behind `pdcore router --policy least_inflight`; the example is
    found only through its entry point."""
    deployment = PDDeployment(
        tiny_llama_dir,
        tmp_path_factory.mktemp("example-pd"),
        backend="tcp",
        env=plugin_env,
        common_args=("--page-size", "4"),
        decode_args=("--attention-backend", "reference", "--schedule-policy", "sjf"),
        router_args=("--policy", "least_inflight"),
        router_env={"PYTHONPATH": plugin_env["PYTHONPATH"], "PDCORE_PLUGINS": ENTRY_POINT},
    )
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()  # every process, whether or not it came up


def _generate(url: str, ids: list[int], stream: bool) -> list[int]:
    body = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW},
        "stream": stream,
    }
    with httpx.Client(base_url=url, timeout=120) as client:
        if not stream:
            r = client.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]
        with client.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            return sse_events(r)[-2]["output_ids"]


def test_pd_over_tcp_with_least_inflight_equals_transformers(
    pd: PDDeployment, tiny_llama_dir: Path
) -> None:
    from pdcore.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    ids = [tok.encode(p) for p in PROMPTS[:6]]
    assert pd.router is not None
    with ThreadPoolExecutor(len(ids)) as pool:  # all at once: they share batches
        jobs = [pool.submit(_generate, pd.router.url, x, i % 2 == 1) for i, x in enumerate(ids)]
        got = [job.result() for job in jobs]
    want = hf_greedy(load_hf_model(str(tiny_llama_dir)), ids, MAX_NEW, [tok.eos_token_id])
    assert got == want
    info = httpx.get(pd.decode.url + "/server_info").json()
    assert (info["attention_backend"], info["schedule_policy"]) == ("reference", "sjf")
    for url in (pd.prefill.url, pd.decode.url):
        metrics = httpx.get(url + "/metrics").text
        sent = [
            x
            for x in metrics.splitlines()
            if x.startswith('pdcore_kv_transfer_bytes{backend="tcp"}')
        ]
        assert sent and float(sent[0].split()[-1]) > 0, metrics
    assert _idle_tokens(pd.prefill.url) == 0
    assert _idle_tokens(pd.decode.url) == 0
