"""Whether the Hub can be reached, asked before anything slow: huggingface_hub retries an unreachable Hub for about
25 s per file before it fails."""

import os
import socket
from urllib.parse import urlparse


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached from here (offline mode set, or its host does not resolve); `None` when it may
    be. Behind a proxy the host is the proxy's to resolve, so nothing is checked."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as error:
        return f"{host} does not resolve ({error}): no network?"
    return None


def push_access_problem(token: str | None) -> str | None:
    """What would make a push with `token` (or the saved login) fail, found before anything is saved or uploaded;
    `None` when the Hub accepts the token."""
    import huggingface_hub

    reason = hub_unreachable_reason()
    if reason is not None:
        return f"the Hub cannot be reached: {reason}"
    token = token or huggingface_hub.get_token()
    if token is None:
        return "no Hugging Face token is set: log in first (hf auth login) or pass a token"
    try:
        huggingface_hub.whoami(token=token)
    except Exception as error:  # connection errors of every kind, an expired or wrong token
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the Hub does not accept this token or cannot be reached ({first_line}): check hf auth whoami"
    return None
