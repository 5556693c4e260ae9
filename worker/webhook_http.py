"""One webhook POST, with two guarantees an HTTP client does not give by itself:

- every address the request connects to is checked against the service's policy
  (app.webhooks.address_allowed) after resolving the host name, and the connection is made
  to that checked address, so DNS cannot point the request elsewhere between check and use
  (TLS still verifies the certificate for the host name);
- the whole attempt (resolving, connecting, TLS, sending, the answer's headers) ends within
  one deadline: per-read timeouts alone let a receiver that trickles a byte at a time hold
  a delivery slot for ever.

httpcore (the transport under httpx) takes a network backend, which is where both go.
Proxies are not used: a webhook goes straight to its receiver. Redirects are not followed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpcore

from app.webhooks import IPAddress, not_allowed_reason, resolve

ERROR_BODY_BYTES = 512  # of a refusing receiver's answer, kept as the reason; the rest is not read


class TargetNotAllowed(Exception):
    """The receiver's host resolves only to addresses the service does not send to."""


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after_s: float | None  # a 429 or 503's Retry-After, in seconds
    body: str  # the start of the answer, for the reason of a refusal


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the attempt's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream, self._deadline = stream, deadline

    def _timeout(self, timeout: float | None, error: type[Exception]) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise error("the attempt ran out of time")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        tls = self._stream.start_tls(ssl_context, server_hostname, self._timeout(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """Connects only to allowed addresses of a host, and only until the deadline."""

    def __init__(self, allowed: Callable[[IPAddress], bool], deadline: float) -> None:
        self._allowed, self._deadline = allowed, deadline
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve '{host}': {getattr(exc, 'strerror', None) or exc}") from exc
        usable = [a for a in addresses if self._allowed(a)]
        if not usable:
            raise TargetNotAllowed(not_allowed_reason(host, addresses))
        error: Exception | None = None
        for address in usable:  # the first that answers, as a browser does
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise httpcore.ConnectTimeout("the attempt ran out of time while connecting")
            try:
                stream = self._backend.connect_tcp(
                    str(address), port, timeout=min(timeout or remaining, remaining),
                    local_address=local_address, socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        assert error is not None
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise TargetNotAllowed("webhooks are only sent over TCP")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header in its seconds form (an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def post(url: str, headers: dict[str, str], body: bytes, allowed: Callable[[IPAddress], bool], timeout_s: float) -> Answer:
    """POST once; raises TargetNotAllowed, or httpcore's errors for a failure to connect, a
    timeout or a broken answer."""
    deadline = time.monotonic() + timeout_s
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
    with httpcore.ConnectionPool(network_backend=GuardedBackend(allowed, deadline), max_connections=1) as pool:
        request = {"headers": list(headers.items()), "content": body, "extensions": {"timeout": timeouts}}
        with pool.stream("POST", url, **request) as response:
            answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            text = b""
            if response.status >= 300:  # an accepting receiver's answer is not needed
                for chunk in response.iter_stream():
                    text += chunk
                    if len(text) >= ERROR_BODY_BYTES:
                        break
            retry_after = _retry_after(answer_headers.get("retry-after")) if response.status in (429, 503) else None
            return Answer(response.status, retry_after, text[:ERROR_BODY_BYTES].decode("utf-8", "replace").strip())


def describe(exc: BaseException) -> str:
    """A delivery error as a person reads it: httpcore's messages say what happened
    ("[Errno 111] Connection refused") but its class names say it better for timeouts."""
    if isinstance(exc, httpcore.TimeoutException):
        return f"timed out: {exc}" if str(exc) else "timed out"
    if isinstance(exc, httpcore.ConnectError):
        return f"could not connect: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
