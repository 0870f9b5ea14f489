"""Publishing a finished run: the adapter with its lineage, atomically, only on success."""

from __future__ import annotations

from lorafleet.bases import base_spec
from lorafleet.registry import AdapterRegistry, Manifest, PublishRequest

from .config import TrainConfig
from .loop import TrainResult
from .methods import METHODS


def publish_result(result: TrainResult, config: TrainConfig, registry: AdapterRegistry, name: str,
                   lineage: dict[str, str] | None = None) -> Manifest:
    method = METHODS[config.method].adapter_method
    request = PublishRequest(
        name=name, base=base_spec(config.base), method=method, aliases=list(config.publish.aliases),
        description=config.publish.description or f"{config.method.value} trained by lorafleet",
        training_config=config.model_dump(mode="json"), dataset_digest=result.data_report.dataset_digest,
        metrics=result.metrics, lineage={**result.lineage, **(lineage or {})},
    )
    return registry.publish_payload(result.payload, request)
