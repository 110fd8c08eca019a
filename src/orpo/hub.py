"""Whether the Hugging Face hub can be reached, asked once per process before the first hub name loads.

Without this, a machine with no route to the hub spends about 25 s per file in huggingface_hub's retries
(five, with back-off, each logging a line) before failing. One short connection attempt decides instead:
when it fails, this process switches huggingface_hub, transformers and datasets to offline mode, so files
already in the local cache still load and anything else fails at once with :func:`offline_reason`.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@cache
def offline_reason() -> str | None:
    """None when hub names may be fetched; otherwise why they come from the local cache only. The first
    call probes the hub (behind a proxy no probe is made: the proxy decides) and, when it is unreachable,
    turns on offline mode for the rest of the process."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlparse(_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return None
    except OSError as err:
        reason = f"{url.scheme}://{url.netloc} is unreachable ({err.strerror or err})"
    _go_offline()
    return reason


def _go_offline() -> None:
    """Offline mode for this process, as ``HF_HUB_OFFLINE=1`` would have set it at start-up (each library
    read the variable once, at import)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True


def explain_failure(name: str, kind: str, local_instead: str) -> str | None:
    """The one-line reason a hub name failed to load when the hub was not asked; None when it was."""
    reason = offline_reason()
    if reason is None:
        return None
    return (
        f"could not load {kind} '{name}': {reason} and it is not in the local Hugging Face cache; "
        f"give {local_instead}, or run where the hub is reachable"
    )
