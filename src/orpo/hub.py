"""Whether the Hugging Face hub can be reached, asked once per process before the first hub name loads.

Without this, a machine with no route to the hub spends about 25 s per file in huggingface_hub's retries
(five, with back-off, each logging a line) before failing. One short request (answered or not within a few seconds) decides instead:
when it fails, this process switches huggingface_hub, transformers and datasets to offline mode, so files
already in the local cache still load and anything else fails at once with :func:`offline_reason`.
"""

from __future__ import annotations

import os
import ssl
from functools import cache
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from urllib.parse import urlparse

from orpo.errors import OrpoError

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
    endpoint = _endpoint()
    try:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("it needs http:// or https:// and a host")
    except ValueError as err:
        raise OrpoError(f"HF_ENDPOINT {endpoint!r} is not a valid URL ({err}); fix it or unset it") from None
    # A request, not only a connection: a mirror that accepts connections and never answers would otherwise
    # hang every download that follows.
    connection = (HTTPSConnection if url.scheme == "https" else HTTPConnection)(
        url.hostname, port, timeout=PROBE_SECONDS
    )
    try:
        connection.request("HEAD", "/")
        connection.getresponse()
        return None
    except ssl.SSLError:  # something answered; the libraries decide about its certificate
        return None
    except TimeoutError:
        reason = f"{url.scheme}://{url.netloc} does not answer within {PROBE_SECONDS:.0f} s"
    except (OSError, HTTPException) as err:
        reason = f"{url.scheme}://{url.netloc} is unreachable ({getattr(err, 'strerror', None) or err})"
    finally:
        connection.close()
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
