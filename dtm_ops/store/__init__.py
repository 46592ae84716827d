"""Feature stores: sharded, checksummed, versioned frame features.

:mod:`dtm_ops.store.format` defines the layout; :mod:`dtm_ops.store.objects` the object
stores (a local folder, S3); :class:`FeatureStore` reads and writes the format on either.
"""

from dtm_ops.store.feature_store import FeatureStore
from dtm_ops.store.format import FORMAT_VERSION, FrameEntry, Manifest, ShardEntry
from dtm_ops.store.objects import S3Config, open_objects

__all__ = ["FORMAT_VERSION", "FeatureStore", "FrameEntry", "Manifest", "S3Config", "ShardEntry", "open_objects"]
