"""Prometheus metrics named lorafleet_*, in the service's own registry (prometheus-client).

Replicas report what they did with each response (where each adapter came from, evictions,
fuse events, what is resident); the gateway turns that into metrics here, so one scrape of
/metrics shows the whole path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .residency import TIERS_FASTEST_FIRST, Residency, Tier
from .usage import UsageLedger

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    def __init__(self, usage: UsageLedger | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        for group in (self._http_metrics, self._adapter_metrics, self._output_cache_metrics, self._tenant_metrics,
                      self._version_metrics):
            group(self.registry)
        self.usage = usage or UsageLedger()  # in memory only, unless given the registry's storage
        self._cumulative_seen: dict[tuple, int] = {}

    def _http_metrics(self, r: CollectorRegistry) -> None:
        """Requests, their latency, passes and overload."""
        self.requests = Counter("lorafleet_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("lorafleet_request_duration_seconds", "HTTP request latency.", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("lorafleet_generation_duration_seconds", "Pipeline time per request.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("lorafleet_queue_depth", "Generation requests in flight or waiting.", registry=r)
        self.overloads = Counter("lorafleet_overload_rejections", "Requests refused with 503 (overload).",
                                 registry=r)
        self.batch_images = Histogram("lorafleet_batch_images", "Images in the pipeline pass a request shared.",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.generations_by_mode = Counter("lorafleet_generations_by_mode",
                                           "Requests by pass mode: base, active, fused, mixed, slot.",
                                           ["mode"], registry=r)
        self.cut_ins = Counter("lorafleet_cut_in_requests", "Requests whose pass ran between two denoising steps of "
                               "another tenant's pass (serve/batching.py).", registry=r)

    def _adapter_metrics(self, r: CollectorRegistry) -> None:
        """Where adapters came from, what is resident, evictions, fuses and failures."""
        self.adapter_loads = Counter("lorafleet_adapter_loads", "Adapters fetched, by the tier that had them.",
                                     ["tier"], registry=r)
        self.adapter_load_seconds = Histogram("lorafleet_adapter_load_duration_seconds",
                                              "Adapter fetch latency by tier.", ["tier"], buckets=LOAD_BUCKETS,
                                              registry=r)
        self.cache_hits = Counter("lorafleet_cache_hits", "Adapter cache hits by tier.", ["tier"], registry=r)
        self.cache_misses = Counter("lorafleet_cache_misses", "Adapter cache misses by tier.", ["tier"], registry=r)
        self.resident_adapters = Gauge("lorafleet_resident_adapters", "Adapters resident per tier and replica.",
                                       ["tier", "replica"], registry=r)
        self.resident_bytes = Gauge("lorafleet_resident_bytes", "Bytes resident per tier and replica.",
                                    ["tier", "replica"], registry=r)
        self.evictions = Counter("lorafleet_cache_evictions", "Adapters evicted, by tier.", ["tier"], registry=r)
        self.fuse_events = Counter("lorafleet_fuse_events", "Fuse and unfuse events.", ["event"], registry=r)
        self.adapter_load_failures = Counter("lorafleet_adapter_load_failures",
                                             "Adapter resolutions or fetches that failed, by error code.", ["code"],
                                             registry=r)
        self.disk_write_failures = Counter("lorafleet_disk_cache_write_failures",
                                           "Adapter files the disk tier could not write (full or failing disk).",
                                           registry=r)
        self.disk_integrity_failures = Counter("lorafleet_disk_cache_integrity_failures",
                                               "Disk-tier files that failed their digest on read (dropped, "
                                               "fetched again).", registry=r)

    def _output_cache_metrics(self, r: CollectorRegistry) -> None:
        """The gateway's output cache."""
        self.output_cache_hits = Counter("lorafleet_output_cache_hits", "Seeded repeats answered from the output "
                                         "cache, by tier.", ["tier"], registry=r)
        self.output_cache_misses = Counter("lorafleet_output_cache_misses", "Cacheable requests not in the output "
                                           "cache (the last tier asked).", ["tier"], registry=r)
        self.output_cache_evictions = Counter("lorafleet_output_cache_evictions", "Output cache entries evicted or "
                                              "expired, by tier.", ["tier"], registry=r)
        self.output_cache_bytes = Gauge("lorafleet_output_cache_bytes", "Bytes in the gateway's output cache.",
                                        registry=r)

    def _tenant_metrics(self, r: CollectorRegistry) -> None:
        """Per-tenant metering and rate limiting."""
        self.tenant_requests = Counter("lorafleet_tenant_requests", "Generation requests admitted, by tenant ('-': "
                                       "operators).", ["tenant"], registry=r)
        self.tenant_images = Counter("lorafleet_tenant_images", "Images asked for, by tenant.", ["tenant"], registry=r)
        self.tenant_work = Counter("lorafleet_tenant_steps_megapixels", "Images x steps x megapixels asked for, by "
                                   "tenant.", ["tenant"], registry=r)
        self.tenant_replica_seconds = Counter("lorafleet_tenant_replica_seconds", "Replica time spent on a tenant's "
                                              "requests (a shared pass split by images).", ["tenant"], registry=r)
        self.rate_limited = Counter("lorafleet_rate_limited", "Requests refused with 429, by tenant.", ["tenant"],
                                    registry=r)

    def _version_metrics(self, r: CollectorRegistry) -> None:
        """Per adapter version: requests, latency and users' ratings (judge a canary)."""
        self.version_requests = Counter("lorafleet_adapter_version_requests", "Generation requests by adapter "
                                        "version and outcome (ok, error): judge a canary.",
                                        ["adapter", "version", "outcome"], registry=r)
        self.version_seconds = Histogram("lorafleet_adapter_version_duration_seconds", "Request latency by adapter "
                                         "version.", ["adapter", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.feedback = Counter("lorafleet_feedback", "User ratings by adapter version and kind (stars, up, down).",
                                ["adapter", "version", "kind"], registry=r)

    def record_tenant_request(self, tenant: str, images: int, work: float) -> None:
        self.tenant_requests.labels(tenant=tenant).inc()
        self.tenant_images.labels(tenant=tenant).inc(images)
        self.tenant_work.labels(tenant=tenant).inc(work)
        self.usage.add(tenant, requests=1, images=images, work=work)

    def record_tenant_replica_time(self, tenant: str, seconds: float) -> None:
        self.tenant_replica_seconds.labels(tenant=tenant).inc(seconds)
        self.usage.add(tenant, replica_seconds=seconds)

    def record_versions(self, manifests: list, outcome: str, seconds: float) -> None:
        for manifest in manifests:
            labels = (manifest.name, str(manifest.version))
            self.version_requests.labels(*labels, outcome).inc()
            if outcome == "ok":
                self.version_seconds.labels(*labels).observe(seconds)

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def record_output(self, output) -> None:
        """What one replica reported about one generation."""
        self.generation_seconds.observe(output.generation_ms / 1000)
        self.batch_images.observe(output.batch_images)
        self.generations_by_mode.labels(mode=output.mode).inc()
        if output.cut_in:
            self.cut_ins.inc()
        for fetch in output.fetches:
            self.adapter_loads.labels(tier=fetch.tier).inc()
            self.adapter_load_seconds.labels(tier=fetch.tier).observe(fetch.seconds)
            served_at = TIERS_FASTEST_FIRST.index(fetch.tier)
            for tier in TIERS_FASTEST_FIRST[:served_at]:
                self.cache_misses.labels(tier=tier).inc()
            if fetch.tier != Tier.registry:
                self.cache_hits.labels(tier=fetch.tier).inc()
        for event in output.fuse_events:
            self.fuse_events.labels(event=event).inc()
        self.evictions.labels(tier=Tier.active).inc(len(output.evicted_active))
        self._record_resident(output.replica, output.resident)

    def _record_resident(self, replica: str, resident: Residency) -> None:
        for tier, info in resident.items():
            self.resident_adapters.labels(tier=tier, replica=replica).set(len(info.digests))
            self.resident_bytes.labels(tier=tier, replica=replica).set(info.bytes)
            if tier != Tier.active:  # replicas report cumulative evictions for host/disk
                self._count_new(self.evictions.labels(tier=tier), ("evictions", tier, replica), info.evictions)
            if tier == Tier.disk:
                self._count_new(self.disk_write_failures, ("write_failures", replica), info.write_failures)
                self._count_new(self.disk_integrity_failures, ("integrity_failures", replica),
                                info.integrity_failures)

    def _count_new(self, counter, key: tuple, total) -> None:
        """Advance ``counter`` by what a replica's cumulative ``total`` grew since it was last seen."""
        seen = self._cumulative_seen.get(key, 0)
        if total is not None and int(total) > seen:
            counter.inc(int(total) - seen)
            self._cumulative_seen[key] = int(total)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
