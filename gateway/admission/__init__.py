"""Admission: who may send a request now, and in what order (tenants, buckets, queue).

The front ends call :meth:`Admission.admit` before routing and release the returned ticket
when the request ends; see ``admission.py`` for the order of checks and ``tenants.py`` for
the config file. Names are imported lazily so that ``python -m gateway.admission.tenants``
runs without importing (and warning about) the module it is about to execute.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.admission.admission import Admission, Ticket, estimate_tokens
    from gateway.admission.tenants import (
        KEY_SECRET_ENV,
        PRIORITY_BATCH,
        PRIORITY_INTERACTIVE,
        AdmissionSettings,
        GlobalLimits,
        Quota,
        Tenant,
        hash_key,
        load_settings,
    )

_WHERE = {
    "Admission": "admission",
    "Ticket": "admission",
    "estimate_tokens": "admission",
    "KEY_SECRET_ENV": "tenants",
    "PRIORITY_BATCH": "tenants",
    "PRIORITY_INTERACTIVE": "tenants",
    "AdmissionSettings": "tenants",
    "GlobalLimits": "tenants",
    "Quota": "tenants",
    "Tenant": "tenants",
    "hash_key": "tenants",
    "load_settings": "tenants",
}

__all__ = [
    "KEY_SECRET_ENV",
    "PRIORITY_BATCH",
    "PRIORITY_INTERACTIVE",
    "Admission",
    "AdmissionSettings",
    "GlobalLimits",
    "Quota",
    "Tenant",
    "Ticket",
    "estimate_tokens",
    "hash_key",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
