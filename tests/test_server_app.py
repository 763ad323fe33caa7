"""The Starlette app in-process, over a stand-in engine client: error paths that a real
engine does not produce on demand (an unexpected exception must still be a JSON 500)."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from pdcore.server.app import build_app
from pdcore.server.generation import ServerState
from pdcore.server.metrics import Metrics
from pdcore.settings import ServerSettings


class _BrokenClient:
    """An engine client whose control ops fail in a way nobody planned for."""

    alive = True

    async def control(self, op: str, timeout: float = 10.0) -> Any:
        raise RuntimeError(f"kaput during {op}")

    def live_rids(self) -> list[str]:
        return []


def offline_app(api_key: str | None = None):
    """The real ASGI app with an engine that never answers (for routes and middleware)."""
    state = ServerState(
        settings=ServerSettings(api_key=api_key),
        client=_BrokenClient(),  # type: ignore[arg-type]
        tokenizer=None,
        model_name="m",
        max_context_len=16,
        engine_info={},
        metrics=Metrics("m"),
        vocab_size=10,
    )
    return build_app(state)


def _app(api_key: str | None = None) -> TestClient:
    return TestClient(offline_app(api_key), raise_server_exceptions=False)


def test_unexpected_exception_is_a_json_500_and_counted() -> None:
    with _app() as client:
        r = client.get("/get_load")
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and "kaput" in err["message"]
        metrics = client.get("/metrics").text
        assert 'pdcore_http_requests_total{route="/get_load",status="500"} 1.0' in metrics
        assert "pdcore_engine_up 0.0" in metrics  # the scrape still answers


def test_auth_runs_before_the_route() -> None:
    with _app(api_key="k") as client:
        assert client.get("/get_load").status_code == 401
        assert client.get("/nowhere").status_code == 401
        assert client.get("/nowhere", headers={"Authorization": "Bearer k"}).status_code == 404
