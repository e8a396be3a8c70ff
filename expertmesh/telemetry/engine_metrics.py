"""vLLM's own engine metrics (``vllm:*``) on the expert's ``/metrics``, labelled with the expert id.

vLLM's ``PrometheusStatLogger`` (on whenever the engine keeps stats: ``disable_log_stats`` off)
registers its metrics in prometheus_client's global registry of the process that runs AsyncLLM,
and updates them from the engine's output loop: KV-cache use (``vllm:kv_cache_usage_perc``),
running and waiting requests, preemptions, vLLM's own TTFT and latencies. This collector reads
them at scrape time and serves them beside the ``expertmesh_*`` metrics, with ``expert`` added
(vLLM labels only ``model_name`` and ``engine``, and two experts may serve one model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import prometheus_client
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)
PREFIX = "vllm:"


class EngineMetrics(Collector):
    """The ``vllm:*`` families of ``source`` (vLLM's registry), each sample also labelled ``expert``."""

    def __init__(self, expert_id: str, source: CollectorRegistry | None = None) -> None:
        self.expert_id = expert_id
        self.source = source or prometheus_client.REGISTRY

    def collect(self) -> Iterator[Metric]:
        try:
            families = [f for f in self.source.collect() if f.name.startswith(PREFIX)]
        except Exception:  # a scrape must never fail because vLLM's registry did
            log.debug("reading vLLM's metrics failed", exc_info=True)
            return
        for family in families:
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [
                Sample(s.name, {**s.labels, "expert": self.expert_id}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
            yield copy

    def describe(self) -> Iterator[Metric]:
        return iter(())  # what vLLM registers is known only once an engine is built
