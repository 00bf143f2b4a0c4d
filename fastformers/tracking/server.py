"""Whether an http(s) tracking server answers, asked before anything heavy is imported: this module imports neither
mlflow nor torch, so `fastformers mlflow.tracking_uri=http://...` pointed at a server that is down, or at a host that
does not resolve, fails within seconds of the command starting (MLflow itself would retry for minutes)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from fastformers.errors import FastformersError

# Seconds that resolving the host, connecting and the answer to /health get, all together. An MLflow server answers
# /health at once; a resolver or a firewall that stays silent is cut off here, well inside 3 s of the start.
SERVER_TIMEOUT_S = 1.5


def check_server(uri: str, setting: str = "mlflow.tracking_uri") -> None:
    """Fails at once, naming the URI, when nothing answers at an http(s) tracking URI. Any answer counts as up (an
    HTTP error, a TLS handshake this check does not configure): MLflow itself then says what is wrong."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    reason = unresolved(uri, deadline)
    if reason is None:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=max(deadline - time.monotonic(), 0.1)):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            if isinstance(getattr(err, "reason", err), ssl.SSLError):  # it answered; MLflow has its own TLS settings
                return
            reason = why_unreachable(err)
    raise FastformersError(
        f"{setting}={uri}: no MLflow server answers there ({reason}); start one, or drop the override to use the "
        "local SQLite store"
    )


def unresolved(uri: str, deadline: float) -> str | None:
    """Why the URI's host cannot be looked up before `deadline` (None when it can): getaddrinfo has no timeout of
    its own, and a resolver that stays silent is retried for 10 s or more, so the lookup runs in a daemon thread
    that is left behind when it is late (it ends with the resolver's own timeout)."""
    host = urllib.parse.urlsplit(uri).hostname
    if not host:
        return "no host in the URI"
    failed: list[OSError | None] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            failed.append(None)
        except OSError as err:
            failed.append(err)

    lookup = threading.Thread(target=look_up, name="fastformers-resolve", daemon=True)
    lookup.start()
    lookup.join(max(deadline - time.monotonic(), 0))
    if not failed:
        return f"{host} not resolved in {SERVER_TIMEOUT_S:g} s"
    return None if failed[0] is None else why_unreachable(failed[0])


def why_unreachable(err: BaseException) -> str:
    """What went wrong, in a few words: connection refused, unknown host, no answer in N s, or the OS's message."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer in {SERVER_TIMEOUT_S:g} s"
    return str(getattr(reason, "strerror", None) or reason)
