"""EngineCore: the engine loop's single step, used in-process (offline API) or by the engine process.

step() = scheduler.schedule() -> model_runner.run() -> postprocess (sample, stop checks,
prefix-cache publishing, freeing pages). The server drives this class; a PD mode plugs in
as a pipeline built by the `PipelineFactory` the caller passes, and reaches the engine only
through `EngineHost` (the `PipelineHost` protocol), never through the core itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from pdcore.engine.config import EngineConfig
from pdcore.engine.detokenizer import IncrementalDetokenizer
from pdcore.engine.dp_attention import DPAttentionSync
from pdcore.engine.page_allocator import PageAllocator
from pdcore.engine.pipeline import BootstrapInfo, Pipeline, PipelineFactory
from pdcore.engine.request import Request, RequestError, RequestOutput
from pdcore.engine.sampler import sample
from pdcore.engine.sampling_params import SamplingParams
from pdcore.engine.scheduler import ScheduledBatch, Scheduler
from pdcore.engine.tp_worker import load_rank
from pdcore.model.config import ModelConfig
from pdcore.model.kv_pool import KVPool
from pdcore.model.parallel import HeadShard, TPGroup
from pdcore.model.pipeline_split import PipelineGrid
from pdcore.plugins import get_plugin_manager, get_registry, notify
from pdcore.profiling import PhaseProfiler

__all__ = [
    "BootstrapInfo",
    "EngineConfig",
    "EngineCore",
    "EngineHost",
    "RequestError",
    "RequestOutput",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING_REQUESTS = 128


class EngineCore:
    def __init__(
        self,
        settings: EngineConfig,
        pipeline_factory: PipelineFactory = Pipeline,
        tp: TPGroup | None = None,
        pp: PipelineGrid | None = None,
        ep_group: TPGroup | None = None,
    ) -> None:
        """Load the model and build the KV pool, scheduler and pipeline. `pipeline_factory`
        picks the mode (the unified `Pipeline` by default; PD modes from pdcore.disagg).
        `tp`: with tensor parallelism, this core is rank 0 (the driver) of that group; the
        other ranks run `pdcore.engine.tp_worker.FollowerWorker`. `pp`: with pipeline
        parallelism, this core is world rank 0 of that grid (stage 0, TP rank 0; its TP
        group is stage 0's, `tp` is not given then; pdcore.engine.pp_stage)."""
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        if settings.random_seed is not None:
            torch.manual_seed(settings.random_seed)
        if pp is not None and tp is not None:
            raise ValueError("with pipeline parallelism the TP group is the grid's (pp.tp)")
        self.tp = pp.tp if pp is not None else tp or TPGroup()
        attention_tp = settings.tp_size
        if settings.enable_dp_attention:
            attention_tp = settings.tp_size // settings.dp_size
            if ep_group is None or ep_group.size != settings.tp_size:
                raise ValueError("--enable-dp-attention: EngineCore needs the EP group of tp_size")
        if self.tp.size != attention_tp or not self.tp.is_driver:
            raise ValueError(
                f"EngineCore is TP rank 0 of tp_size {attention_tp}; got rank "
                f"{self.tp.rank} of a group of {self.tp.size}"
            )
        # dp-attention: the dp ranks step in lock-step (pdcore.engine.dp_attention).
        self.dp_sync = (
            DPAttentionSync(ep_group)
            if ep_group is not None and settings.enable_dp_attention
            else None
        )
        self.settings = settings
        started = time.monotonic()
        self.pp = pp
        if pp is not None:
            from pdcore.engine.pp_stage import load_stage

            loaded = load_stage(settings, pp)
        else:
            loaded = load_rank(settings, self.tp, ep_group)
        self.resolved = loaded.resolved
        config = self.resolved.config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.page_size = settings.page_size
        num_pages = loaded.num_pages
        self.max_context_len = loaded.max_context_len
        self.runner = loaded.runner
        self.allocator = PageAllocator(
            num_pages, settings.page_size, not settings.disable_radix_cache
        )
        self.max_running_requests = settings.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS
        self.scheduler = Scheduler(
            self.allocator,
            get_registry("schedule_policy").create(settings.schedule_policy),
            self.max_running_requests,
            settings.chunked_prefill_size,
        )
        from pdcore.model.text_tokenizer import load_text_tokenizer

        self.tokenizer = load_text_tokenizer(settings.model_path, settings.tokenizer_path)
        eos = set(config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.model_name = settings.served_model_name or self.resolved.name
        self._requests: dict[str, Request] = {}
        self._finished_outside_step: list[Request] = []
        self._ready_outputs: list[RequestOutput] = []
        self.num_forward_steps = 0
        self.num_idle_passes = 0
        self.last_step_ran_forward = False
        self._observe_finish = bool(
            get_plugin_manager().hook.pdcore_request_finished.get_hookimpls()
        )
        try:
            self.pipeline = pipeline_factory(EngineHost(self))
        except BaseException:
            self._stop_followers()  # followers blocked in the next broadcast: let them go
            raise
        self.profiler = (
            None
            if settings.profile is None
            else PhaseProfiler.from_settings(
                settings.profile, tag=f"{self.pipeline.mode}-pid{os.getpid()}"
            )
        )
        self.startup_seconds = time.monotonic() - started
        logger.info("engine ready in %.1fs (%s, %s)", self.startup_seconds, self.device, self.dtype)

    # ----- requests in -------------------------------------------------------------------
    def add_request(
        self,
        rid: str,
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        bootstrap: BootstrapInfo | None = None,
    ) -> None:
        if rid in self._requests:
            raise RequestError(f"request id '{rid}' is already in use")
        if not input_ids:
            raise RequestError("the prompt is empty")
        vocab = self.resolved.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in input_ids):
            raise RequestError(f"input_ids must be token ids in [0, {vocab})")
        if len(input_ids) >= self.max_context_len:
            raise RequestError(
                f"the prompt has {len(input_ids)} tokens but this model's context length is "
                f"{self.max_context_len}; shorten the prompt"
            )
        req = Request(
            rid=rid,
            prompt_ids=list(input_ids),
            params=params,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, params.stop, params.skip_special_tokens
            ),
            return_logprob=return_logprob,
            max_len=self.max_context_len,
        )
        if params.max_new_tokens == 0 and self.pipeline.mode == "null":
            self._requests[rid] = req
            req.finish_reason = {"type": "length", "length": 0}
            self._finished_outside_step.append(req)
            return
        self.pipeline.add(req, bootstrap)  # may refuse (RequestError) before we track it
        self._requests[rid] = req

    def abort_request(self, rid: str, message: str = "aborted") -> bool:
        req = self._requests.get(rid)
        if req is None or req.finished:
            return False
        if not self.pipeline.abort(req, message):
            self.scheduler.remove(req)
        req.finish_reason = {"type": "abort", "message": message}
        self._finished_outside_step.append(req)
        return True

    def finish_request(self, req: Request, reason: dict[str, Any]) -> None:
        """End a request from outside a forward pass (a pipeline's failure or completion);
        frees its pages and reports it in the next step."""
        if req in self._finished_outside_step:
            return
        self.scheduler.remove(req)
        if req.finish_reason is None:
            req.finish_reason = reason
        self._finished_outside_step.append(req)

    def start_decoding(self, req: Request, first_token: int, logprob: float | None) -> None:
        """Decode mode: a request whose prompt KV arrived joins the running batch with the
        first token prefill sampled, exactly where unified mode would be after prefill."""
        req.num_computed = len(req.prompt_ids)
        self._publish_full_pages(req)
        self._append_token(req, first_token, logprob)
        if req.finish_reason is not None:
            self.finish_request(req, req.finish_reason)
            return
        self.scheduler.adopt_running(req)
        self._ready_outputs.append(req.take_output())

    # ----- the loop ----------------------------------------------------------------------
    def has_work(self) -> bool:
        return (
            self.scheduler.has_work()
            or bool(self._finished_outside_step)
            or self.pipeline.num_queued() > 0
        )

    def step(
        self, send_early: Callable[[list[RequestOutput]], None] | None = None
    ) -> list[RequestOutput]:
        """One iteration. Outputs that exist before the forward pass (a request that just
        arrived from prefill with its first token, aborts, failures) go to `send_early`
        when given, so they reach the client now instead of one forward pass later."""
        self.pipeline.advance()
        outputs, self._ready_outputs = self._ready_outputs, []
        outputs.extend(self._finish(req) for req in self._finished_outside_step)
        self._finished_outside_step = []
        if outputs and send_early is not None:
            send_early(outputs)
            outputs = []
        batch = self.scheduler.schedule()
        self.last_step_ran_forward = batch is not None
        if self.dp_sync is not None and self.dp_sync.turn(batch is not None) and batch is None:
            self._idle_pass()  # a peer's MoE layers need ours
        if batch is None:
            return outputs
        forward = self.runner.build(batch)
        profile = (
            nullcontext()
            if self.profiler is None
            else self.profiler.step(forward.is_decode, forward.num_seqs, len(forward.input_ids))
        )
        with profile:
            logits = self.runner.run(forward)
            outputs.extend(self._postprocess(batch, logits))
        self.num_forward_steps += 1
        return outputs

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[RequestOutput]:
        sampled: list[Request] = []
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.num_computed += n
            self._publish_full_pages(req)
            if req.num_computed == req.seq_len:
                sampled.append(req)
        if not sampled:
            return []
        tokens, logprobs = sample(logits, sampled, self.eos_ids)
        outputs = []
        for i, req in enumerate(sampled):
            logprob = None if logprobs is None else logprobs[i]
            first = not req.output_ids
            self._append_token(req, tokens[i], logprob)
            if first and self.pipeline.after_prefill(req, logprob):
                continue  # prefill mode: the KV is on its way to decode
            if req.finished:
                self.scheduler.remove(req)
                outputs.append(self._finish(req))
            else:
                outputs.append(req.take_output())
        return outputs

    def _publish_full_pages(self, req: Request) -> None:
        if not self.allocator.enable_prefix_cache:
            return
        ps = self.page_size
        full = req.num_computed // ps
        if full <= len(req.page_hashes):
            return
        ids = req.all_ids
        for i in range(len(req.page_hashes), full):
            parent = req.page_hashes[-1] if req.page_hashes else 0
            req.page_hashes.append(
                self.allocator.publish(req.pages[i], parent, ids[i * ps : (i + 1) * ps])
            )

    def _append_token(self, req: Request, token: int, logprob: float | None) -> None:
        req.output_ids.append(token)
        req.pending_ids.append(token)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        matched_stop = req.detokenizer.append(token)
        p = req.params
        if matched_stop is not None:
            req.finish_reason = {"type": "stop", "matched": matched_stop}
        elif (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)) and len(
            req.output_ids
        ) >= p.min_new_tokens:
            req.finish_reason = {"type": "stop", "matched": token}
        if req.finish_reason is None and (
            len(req.output_ids) >= p.max_new_tokens or req.seq_len >= req.max_len
        ):
            req.finish_reason = {"type": "length", "length": len(req.output_ids)}

    def _finish(self, req: Request) -> RequestOutput:
        self._requests.pop(req.rid, None)
        out = req.take_output()
        if self._observe_finish:
            notify(
                "pdcore_request_finished",
                {
                    "rid": req.rid,
                    "disaggregation_mode": self.pipeline.mode,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "cached_tokens": out.cached_tokens,
                    "finish_reason": out.finish_reason,
                    "e2e_latency_s": time.monotonic() - req.arrival_time,
                },
            )
        return out

    def keepalive(self) -> None:
        """Call while idle: with TP, tells the followers rank 0 is alive (at most once a
        second). Raises when a TP rank is gone, so an idle server notices too. With
        dp-attention, takes this iteration's lock-step turn (see step())."""
        broadcaster = self.runner.broadcaster
        if broadcaster is not None:
            broadcaster.heartbeat()
        if self.dp_sync is not None and self.dp_sync.turn(False):
            self._idle_pass()  # a peer's MoE layers need ours

    @property
    def peers_busy(self) -> bool:
        """dp-attention: a peer ran a forward pass last turn (so don't sleep long)."""
        return self.dp_sync is not None and self.dp_sync.any_busy

    def _idle_pass(self) -> None:
        # Only MoE families (pdcore.model.decoder.Decoder) build with an EP group.
        model: Any = self.runner.model
        model.expert_parallel_idle()
        self.num_idle_passes += 1

    def close(self) -> None:
        """Shutdown: the pipeline ends its rooms and transport; a profile still recording
        is written as it is; TP followers are told to stop. Safe to call once the loop has
        stopped."""
        try:
            if self.profiler is not None:
                self.profiler.finish()
        finally:
            try:
                self.pipeline.close()
            finally:
                self._stop_followers()

    def _stop_followers(self) -> None:
        broadcaster = self.runner.broadcaster
        if broadcaster is None:
            return
        self.runner.broadcaster = None
        try:
            broadcaster.stop()
        except Exception as exc:  # a follower already gone: nothing left to stop
            logger.warning("could not tell the TP followers to stop: %s", exc)
        self.tp.close()

    # ----- introspection -----------------------------------------------------------------
    @property
    def pp_size(self) -> int:
        return 1 if self.pp is None else self.pp.pp_size

    def flush_cache(self) -> bool:
        if self.scheduler.has_work() or self.pipeline.num_queued():
            return False
        self.allocator.flush()
        return True

    def get_load(self) -> dict[str, Any]:
        """SGLang's load fields, plus the TP size and, per TP rank, the KV tokens its pool
        holds and the KV transfers in flight on it. Rank 0's allocator is the one page
        table of every rank (a page id names the same slots everywhere), so a page freed
        here is free on all of them; what a follower can still hold on its own is a
        transfer its agent has not finished."""
        queued = self.pipeline.num_queued()
        tokens = self.allocator.num_used() * self.page_size
        transfers = self.pipeline.transfers_by_rank()
        tp, pp = self.tp.size, self.pp_size
        return {
            "num_reqs": len(self.scheduler.running) + len(self.scheduler.waiting) + queued,
            "num_waiting_reqs": len(self.scheduler.waiting) + queued,
            "num_tokens": tokens,
            "tp_size": tp,
            "pp_size": pp,
            # Every rank of the instance (with --pp-size: stage by stage, rank = stage * tp +
            # tp_rank); one page table serves them all.
            "ranks": [
                {
                    "tp_rank": r % tp,
                    "pp_rank": r // tp,
                    "num_tokens": tokens,
                    "kv_transfers": transfers.get(r, 0),
                }
                for r in range(tp * pp)
            ],
        }

    def kv_cache_blocks(self) -> dict[str, Any]:
        """The prefix cache's pages as chain hashes (`page_allocator.page_hash`), for a
        KV-aware router: it hashes a prompt's token ids the same way and counts the leading
        pages found here."""
        return {"page_size": self.page_size, "hashes": self.allocator.cached_hashes()}

    def get_stats(self, drain_samples: bool = False) -> dict[str, Any]:
        """Gauges and counters; `drain_samples` (only /metrics) also hands out the transfer
        latency samples gathered since the last drain."""
        return {
            "num_running_reqs": len(self.scheduler.running),
            "num_waiting_reqs": len(self.scheduler.waiting),
            "kv_pages_used": self.allocator.num_used(),
            "kv_pages_total": self.allocator.capacity,
            "page_size": self.page_size,
            "num_tokens": self.allocator.num_used() * self.page_size,
            "prefix_cache_tokens": self.allocator.num_cached() * self.page_size,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_forward_steps": self.num_forward_steps,
            # dp-attention: passes run for a peer's batch with none of this rank's own
            "num_idle_passes": self.num_idle_passes,
            **self.pipeline.queue_sizes(),
            **self.pipeline.metrics(drain_samples),  # PD: {"transfer": {backend: {...}}}
        }

    def server_info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_path": self.resolved.source,
            "served_model_name": self.model_name,
            **_model_kind(self.resolved.config),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "page_size": self.page_size,
            "max_total_tokens": self.allocator.capacity * self.page_size,
            "max_running_requests": self.max_running_requests,
            "context_length": self.max_context_len,
            "chunked_prefill_size": s.chunked_prefill_size,
            "schedule_policy": s.schedule_policy,
            "attention_backend": s.attention_backend,
            "disable_radix_cache": s.disable_radix_cache,
            "disaggregation_mode": self.pipeline.mode,
            "tp_size": self.tp.size,
            "pp_size": self.pp_size,
            "kv_heads_per_rank": self.runner.model.num_kv_heads,
            "vocab_size": self.resolved.config.vocab_size,
            "model_folder": str(Path(self.resolved.folder)),
            "startup_seconds": round(self.startup_seconds, 3),
        }


def _model_kind(config: ModelConfig) -> dict[str, Any]:
    """/server_info's word on the model: HF architecture, attention (KV layout), MoE."""
    from pdcore.model.registry import family_for

    family = family_for(config)
    return {"architecture": family.architecture, "attention": family.attention, "moe": family.moe}


class EngineHost:
    """The engine as a pipeline sees it (`PipelineHost`): admit, detach, drop, pages,
    finish, start decoding. A narrow object rather than the core itself, so a pipeline
    cannot come to depend on the scheduler's or the allocator's internals."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core

    @property
    def page_size(self) -> int:
        return self._core.page_size

    @property
    def kv_pool(self) -> KVPool:
        return self._core.runner.pool

    @property
    def tp_group(self) -> TPGroup:
        return self._core.tp

    @property
    def kv_head_range(self) -> tuple[int, int]:
        config = self._core.resolved.config
        shard = HeadShard.of(config, self._core.tp.size, self._core.tp.rank)
        return shard.kv_head_start, config.num_kv_heads

    @property
    def pipeline_grid(self) -> PipelineGrid | None:
        return self._core.pp

    @property
    def layer_range(self) -> tuple[int, int]:
        return 0, self._core.resolved.config.num_layers  # rank 0 holds stage 0's, from 0

    def admit(self, req: Request) -> None:
        self._core.scheduler.add(req)

    def detach(self, req: Request) -> None:
        self._core.scheduler.detach(req)

    def drop(self, req: Request) -> None:
        self._core.scheduler.remove(req)

    def reserve_pages(self, count: int, in_flight: int) -> list[int] | None:
        scheduler = self._core.scheduler
        allocator = self._core.allocator
        running = len(scheduler.running)
        # Keep a page per running request, and per request whose KV is on its way (it joins
        # the running batch next), so pre-allocation never starves decoding.
        if running + in_flight >= scheduler.max_running:
            return None
        if count > allocator.num_available() - running - in_flight:
            return None
        return allocator.allocate(count)

    def release_pages(self, pages: list[int]) -> None:
        self._core.allocator.release(pages)

    def finish_request(self, req: Request, reason: dict[str, Any]) -> None:
        self._core.finish_request(req, reason)

    def start_decoding(self, req: Request, first_token: int, logprob: float | None) -> None:
        self._core.start_decoding(req, first_token, logprob)
