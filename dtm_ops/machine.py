"""What machine this is, as far as speed goes: for the benchmarks' tables and for the
matcher's picks kept on disk (:mod:`dtm_ops.picks`)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU as Linux names it, e.g. ``AMD EPYC (family 25, model 17), AVX512``: the vendor's
    name alone (a virtual machine's may be only ``AMD EPYC``) does not tell generations apart."""
    import torch

    fields = cpu_info()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"
