"""Hugging Face hub names: when the hub cannot be reached, fail at once with the local alternative in the message
(the libraries would retry for half a minute and end in a long stack of connection errors)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from huggingface_hub import constants


def require_hub(name: str, what: str, local_alternative: str, timeout_s: float = 3.0) -> None:
    """Raise ValueError naming `what` (e.g. "data.dataset") and `local_alternative` if the hub is out of reach.

    With HF_HUB_OFFLINE set (huggingface_hub's own switch), nothing is checked: the libraries then read their cache.
    """
    if constants.HF_HUB_OFFLINE:
        return
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(
            f"{what} {name!r} is a name on the Hugging Face hub, but {host} cannot be reached ({e.strerror or e}): "
            f"{local_alternative}; or, if it is in the Hugging Face cache already, set HF_HUB_OFFLINE=1"
        ) from None
