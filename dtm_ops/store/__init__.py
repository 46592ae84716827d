"""Feature stores: sharded, checksummed frame features with a manifest.

:mod:`dtm_ops.store.format` is the one place that defines the layout; backends
(:mod:`dtm_ops.store.local`) read and write it.
"""

from dtm_ops.store.format import FORMAT_VERSION, FrameEntry, Manifest, ShardEntry
from dtm_ops.store.local import LocalFeatureStore

__all__ = ["FORMAT_VERSION", "FrameEntry", "LocalFeatureStore", "Manifest", "ShardEntry"]
