"""Helpers for running the workflow on more than one machine (or process).

``worker_hostname`` is for Airflow's ``[core] hostname_callable``: where several Celery
workers share a host (one per GPU, or the loopback cluster of scripts/loopback-cluster.sh),
``DTM_WORKER_NAME`` names each, so that a task instance's ``hostname`` says which worker ran
it. Without the variable it is the host's fully qualified name, as Airflow's default.
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    return os.environ.get("DTM_WORKER_NAME") or socket.getfqdn()
