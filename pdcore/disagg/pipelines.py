"""Pick the engine pipeline for a `--disaggregation-mode`.

The engine never names `pdcore.disagg` (it only knows the `PipelineHost` seam); whoever
starts an engine asks this module for the factory of the mode's pipeline and hands it to
`EngineCore`.
"""

from __future__ import annotations

from typing import Literal

from pdcore.disagg.settings import DisaggSettings
from pdcore.engine.pipeline import Pipeline, PipelineFactory, PipelineHost

DisaggregationMode = Literal["null", "prefill", "decode"]


def pipeline_factory(
    mode: DisaggregationMode, settings: DisaggSettings, bind_host: str
) -> PipelineFactory:
    """The factory of `mode`'s pipeline: unified (`null`), prefill or decode. `bind_host` is
    the address a PD side's control plane binds and advertises (the server's --host)."""
    if mode == "prefill":
        from pdcore.disagg.prefill import PrefillPipeline

        def prefill(host: PipelineHost) -> Pipeline:
            return PrefillPipeline(host, settings, bind_host)

        return prefill
    if mode == "decode":
        from pdcore.disagg.decode import DecodePipeline

        def decode(host: PipelineHost) -> Pipeline:
            return DecodePipeline(host, settings, bind_host)

        return decode
    return Pipeline
