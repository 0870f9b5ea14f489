"""The versioned adapter registry: what an adapter is, and where its versions live.

serve/ and training/ import the adapter vocabulary from here: ``AdapterRef`` / ``AdapterId``
(identity), ``Manifest`` (what a version is), ``AdapterRegistry`` (the operations).
"""

from lorafleet.errors import LorafleetError

from .adapter_registry import AdapterRegistry, AliasRecord, GcReport, PublishRequest
from .identity import AdapterId, AdapterRef
from .manifest import AdapterFormat, AdapterMethod, ComponentLora, Manifest

__all__ = [
    "AdapterFormat", "AdapterId", "AdapterMethod", "AdapterRef", "AdapterRegistry", "AliasRecord", "ComponentLora",
    "GcReport", "LorafleetError", "Manifest", "PublishRequest",
]
