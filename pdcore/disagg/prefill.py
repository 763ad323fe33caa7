"""The prefill instance's request lifecycle, in one place (the reference's three queues).

1. Bootstrap queue: a KVSender per request handshakes with its decode instance, which
   pre-allocates pages for the prompt; until then the prompt is not computed.
2. Waiting queue: the engine's ordinary scheduler runs the prompt through the model
   (chunked prefill and prefix caching as in unified mode) and samples the first token.
3. Inflight queue: the prompt's pages and the first token go to decode; the request
   holds its pages until the transfer is polled done (non-blocking), then finishes.
Any failure (handshake, timeout, dead peer, abort) ends the request with a clear reason
and frees its pages.
"""

from __future__ import annotations

from typing import Any

from pdcore.disagg.kv_poll import KVPoll, pd_failure
from pdcore.disagg.kv_sender import KVSender, PrefillKVManager
from pdcore.disagg.settings import DisaggSettings
from pdcore.disagg.tp_plan import tp_place
from pdcore.engine.pipeline import BootstrapInfo, Pipeline, PipelineHost
from pdcore.engine.request import Request, RequestError
from pdcore.engine.scheduler import pages_for


class PrefillPipeline(Pipeline):
    mode = "prefill"

    def __init__(self, host: PipelineHost, settings: DisaggSettings, bind_host: str) -> None:
        """`bind_host`: the address the bootstrap server and the control socket listen on
        (the server's --host)."""
        super().__init__(host)
        self.manager = PrefillKVManager(settings, host.kv_pool, bind_host, *tp_place(host))
        self.bootstrap_queue: dict[Request, KVSender] = {}
        self.inflight: dict[Request, KVSender] = {}
        self._senders: dict[Request, KVSender] = {}

    def add(self, req: Request, bootstrap: BootstrapInfo | None) -> None:
        if bootstrap is None or bootstrap.room is None:
            raise RequestError(
                "this server runs with --disaggregation-mode prefill: requests need a "
                "bootstrap_room (send them through a PD router)"
            )
        sender = self.manager.create_sender(bootstrap.room)
        self._senders[req] = sender
        self.bootstrap_queue[req] = sender

    def advance(self) -> None:
        self.manager.tick()
        for req, sender in list(self.bootstrap_queue.items()):
            state = sender.poll()
            if state == KVPoll.WaitingForInput:
                del self.bootstrap_queue[req]
                self.host.admit(req)
            elif state == KVPoll.Failed:
                del self.bootstrap_queue[req]
                self._fail(req, sender)
        for req, sender in list(self.inflight.items()):
            state = sender.poll()
            if state == KVPoll.Success:
                del self.inflight[req]
                self._senders.pop(req, None)
                # The prefill leg's answer: its one token; the client reads decode's.
                self.host.finish_request(req, {"type": "length", "length": len(req.output_ids)})
            elif state == KVPoll.Failed:
                del self.inflight[req]
                self._fail(req, sender)

    def after_prefill(self, req: Request, logprob: float | None) -> bool:
        sender = self._senders[req]
        prompt_pages = req.pages[: pages_for(len(req.prompt_ids), self.host.page_size)]
        sender.send(prompt_pages, req.output_ids[0], logprob)
        self.host.detach(req)
        self.inflight[req] = sender
        return True

    def _fail(self, req: Request, sender: KVSender) -> None:
        self._senders.pop(req, None)
        reason = sender.failure_reason or "KV transfer to the decode instance failed"
        self.host.finish_request(req, pd_failure(f"prefill: {reason}"))

    def abort(self, req: Request, message: str) -> bool:
        sender = self._senders.pop(req, None)
        if sender is None:
            return False
        sender.abort(message)
        self.bootstrap_queue.pop(req, None)
        self.inflight.pop(req, None)
        self.host.drop(req)  # frees its pages wherever it was
        return True

    def num_queued(self) -> int:
        return len(self.bootstrap_queue) + len(self.inflight)

    def queue_sizes(self) -> dict[str, float]:
        return {
            "num_bootstrap_queue_reqs": len(self.bootstrap_queue),
            "num_inflight_queue_reqs": len(self.inflight),
        }

    def metrics(self, drain_samples: bool = False) -> dict[str, Any]:
        return self.manager.metrics(drain_samples)

    def transfers_by_rank(self) -> dict[int, int]:
        return self.manager.transfers_by_rank()

    def close(self) -> None:
        self.manager.close()
