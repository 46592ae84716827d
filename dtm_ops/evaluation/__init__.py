"""Retrieval evaluation: DTM against pooled-feature baselines, by ROI size (``dtm eval``)."""
