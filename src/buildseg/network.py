"""Is a download possible now? Asked once per process, answered in seconds.

Without a network, timm's ``pretrained=True`` spends about a minute in retries before it
fails. :func:`offline_reason` answers first: the hub's offline switches, or one TCP connect
to the Hugging Face hub with a short timeout. Behind a proxy (``HTTPS_PROXY``) the direct
connect says nothing, so no probe is made and the download is left to try.
"""

from __future__ import annotations

import functools
import os
import socket

HUB = ("huggingface.co", 443)
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """Why a weights download cannot work now (``"HF_HUB_OFFLINE is set"``, ``"no network
    ..."``), or None when it may."""
    for name in OFFLINE_SWITCHES:
        if _truthy(os.environ.get(name)):
            return f"{name} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection(HUB, timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"no network ({HUB[0]}:{HUB[1]} unreachable: {exc.strerror or type(exc).__name__})"
    return None
