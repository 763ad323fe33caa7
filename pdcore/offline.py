"""pdcore.Engine: generate in-process from scripts and tests, no server involved."""

from __future__ import annotations

import itertools
from typing import Any, cast

from pdcore.disagg.pipelines import pipeline_factory
from pdcore.engine.core import EngineCore
from pdcore.engine.sampling_params import SamplingParams
from pdcore.model.generation_defaults import sampling_defaults
from pdcore.settings import ServerSettings


class Engine:
    """Engine(model_path=None, dtype="float32", ...) takes the flags of `pdcore serve` as kwargs."""

    def __init__(self, **settings: Any) -> None:
        s = ServerSettings(**settings)
        self.core = EngineCore(
            s.engine_config(), pipeline_factory(s.disaggregation_mode, s, s.host)
        )
        self.tokenizer = self.core.tokenizer
        # --sampling-defaults: what unset temperature/top_p/... take, as in `pdcore serve`.
        self.sampling_defaults = sampling_defaults(s.sampling_defaults, s.model_path)
        self._ids = itertools.count()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Like SGLang's Engine.generate: one result dict per prompt (a list for list input)."""
        single = (isinstance(prompt, str)) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        batch_ids: list[list[int]]
        if input_ids is not None:
            # `single` tells the two shapes apart (a flat list of ints is one prompt).
            batch_ids = (
                [cast("list[int]", input_ids)] if single else cast("list[list[int]]", input_ids)
            )
        else:
            prompts = [prompt] if single else list(prompt or [])
            batch_ids = [self.tokenizer.encode(p) for p in prompts]
        params_list = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(batch_ids)
        )
        results: dict[str, dict[str, Any]] = {}
        order = []
        for ids, params in zip(batch_ids, params_list):
            rid = f"offline-{next(self._ids)}"
            order.append(rid)
            results[rid] = {"text": "", "output_ids": [], "logprobs": []}
            params_obj = SamplingParams.from_dict(params, self.sampling_defaults.params)
            self.core.add_request(rid, ids, params_obj, return_logprob)
        pending = set(order)
        while pending:
            for out in self.core.step():
                res = results[out.rid]
                res["text"] += out.new_text
                res["output_ids"].extend(out.new_token_ids)
                if out.new_logprobs:
                    res["logprobs"].extend(out.new_logprobs)
                if out.finished:
                    pending.discard(out.rid)
                    res["meta_info"] = {
                        "id": out.rid,
                        "finish_reason": out.finish_reason,
                        "prompt_tokens": out.prompt_tokens,
                        "completion_tokens": out.completion_tokens,
                        "cached_tokens": out.cached_tokens,
                    }
        outputs = [results[rid] for rid in order]
        return outputs[0] if single else outputs
