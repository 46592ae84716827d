"""dtm-ops results view: Airflow loads plugins from this folder (``[core] plugins_folder``).
Everything lives in :mod:`dtm_ops.ui`."""

from dtm_ops.ui.plugin import DtmResultsPlugin  # noqa: F401 - found by Airflow's plugin manager
