"""Settings from SGLang's env vars, the store URL check, the transport choice."""

from __future__ import annotations

import pytest
from pd_ascend.settings import (
    MEMFABRIC,
    MOONCAKE,
    load_settings,
    mf_role,
    mooncake_server_name,
    parse_store_url,
)

_VARS = (
    "ASCEND_MF_STORE_URL",
    "ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE",
    "ASCEND_NPU_PHY_ID",
    "ASCEND_MF_TRANSFER_PROTOCOL",
    "PDCORE_ASCEND_MF_STORE_URL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _VARS:
        monkeypatch.delenv(var, raising=False)


def test_defaults_pick_memfabric_without_a_store() -> None:
    s = load_settings()
    assert s.transport == MEMFABRIC
    assert s.ascend_mf_store_url is None
    assert s.ascend_npu_phy_id == -1
    assert s.ascend_mf_transfer_protocol == "sdma"


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("tcp://192.168.1.1:50000", ("tcp", "192.168.1.1", 50000, None)),
        ("tcp://node-7.cluster:6650", ("tcp", "node-7.cluster", 6650, None)),
        ("etcd://10.0.0.2:2379#inst_1", ("etcd", "10.0.0.2", 2379, "inst_1")),
        ("reg://[fe80::1]:9000", ("reg", "[fe80::1]", 9000, None)),
    ],
)
def test_store_urls_memfabric_accepts(url: str, parts: tuple[object, ...]) -> None:
    u = parse_store_url(url)
    assert (u.scheme, u.host, u.port, u.instance) == parts


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("192.168.1.1:50000", "malformed"),
        ("tcp://192.168.1.1", "malformed"),
        ("http://192.168.1.1:80", "unknown scheme 'http'"),
        ("tcp://host:70000", "port 70000 is not in 1..65535"),
        ("tcp://host:0", "port 0"),
        ("tcp://host:5000#x", "only etcd:// and reg:// take #ID"),
        ("tcp://ho st:5000", "malformed"),
    ],
)
def test_malformed_store_url_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, url: str, why: str
) -> None:
    with pytest.raises(ValueError, match="ASCEND_MF_STORE_URL") as exc:
        parse_store_url(url)
    assert why in str(exc.value)
    monkeypatch.setenv("ASCEND_MF_STORE_URL", url)
    with pytest.raises(ValueError) as exc:
        load_settings()
    msg = str(exc.value)
    assert msg.startswith("ASCEND_MF_STORE_URL=") and why in msg and "tcp://HOST:PORT" in msg


def test_env_vars_under_sglang_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_MF_STORE_URL", " tcp://10.1.1.1:6650 ")
    monkeypatch.setenv("ASCEND_NPU_PHY_ID", "5")
    monkeypatch.setenv("ASCEND_MF_TRANSFER_PROTOCOL", "DEVICE_RDMA")
    s = load_settings()
    assert s.ascend_mf_store_url == "tcp://10.1.1.1:6650"
    assert s.ascend_npu_phy_id == 5
    assert s.ascend_mf_transfer_protocol == "device_rdma"
    # The PDCORE_ name wins over the SGLang one.
    monkeypatch.setenv("PDCORE_ASCEND_MF_STORE_URL", "etcd://e:2379")
    assert load_settings().ascend_mf_store_url == "etcd://e:2379"


@pytest.mark.parametrize(
    ("value", "transport"),
    [
        ("true", MOONCAKE),
        ("1", MOONCAKE),
        ("True", MOONCAKE),
        ("false", MEMFABRIC),
        ("0", MEMFABRIC),
    ],
)
def test_mooncake_switch_chooses_the_transport(
    monkeypatch: pytest.MonkeyPatch, value: str, transport: str
) -> None:
    monkeypatch.setenv("ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE", value)
    assert load_settings().transport == transport


@pytest.mark.parametrize(
    ("var", "value", "expect"),
    [
        ("ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE", "maybe", "ENABLE_ASCEND_TRANSFER_WITH_MOONCAKE:"),
        (
            "ASCEND_NPU_PHY_ID",
            "-2",
            "ASCEND_NPU_PHY_ID: Input should be greater than or equal to -1",
        ),
        ("ASCEND_NPU_PHY_ID", "npu0", "ASCEND_NPU_PHY_ID:"),
        ("ASCEND_MF_TRANSFER_PROTOCOL", "hccs", "ASCEND_MF_TRANSFER_PROTOCOL:"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expect: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=expect):
        load_settings()


def test_memfabric_role_and_mooncake_server_name() -> None:
    assert mf_role("auto", "prefill-host-1-ab") == "Prefill"
    assert mf_role("auto", "decode-host-1-ab") == "Decode"
    assert mf_role("auto", "sender") == "Prefill"
    assert mf_role("Decode", "prefill-x") == "Decode"
    # Mooncake's Ascend name carries the physical NPU id: ASCEND_NPU_PHY_ID, else the logical id.
    assert mooncake_server_name("10.0.0.1", 12345, -1, 2) == "10.0.0.1:12345:npu_2"
    assert mooncake_server_name("10.0.0.1", 12345, 6, 2) == "10.0.0.1:12345:npu_6"
