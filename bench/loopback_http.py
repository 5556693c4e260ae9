"""A lean HTTP/1.1 client for the load benchmark: one keep-alive connection per client,
requests written by hand and responses parsed by httptools (the C parser uvicorn uses).

Why not httpx: on this 2-core machine the load generator shares the cores with the server
it measures. httpx spent about 3 ms of CPU per request here (a quarter of a core at 50
clients), and every response that arrived while the generator's one event loop was busy
with another client's request waited for it, counted as the server's latency. This client
costs a small fraction of that, so what is measured is the server. Loopback only: plain
HTTP, no proxies, no redirects, no TLS.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class ConnectionLost(OSError):
    """The server closed the connection before the whole response arrived."""


@dataclass
class Response:
    status_code: int
    content: bytes

    def json(self):
        return jsonlib.loads(self.content)


class _ResponseReader:
    """httptools callbacks: collects one response's status and body."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.done = False
        self.keep_alive = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()


class LoopbackClient:
    """`await client.request("POST", "/v1/jobs", json=...)`; one request at a time."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"plain http:// URLs only, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        lines = [f"Host: {parts.netloc}", "Connection: keep-alive", "Accept: */*"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self._headers = "\r\n".join(lines)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, json=None) -> Response:
        async with asyncio.timeout(self.timeout):
            try:
                return await self._exchange(method, path, json)
            except BaseException:
                await self.aclose()  # a half-read response leaves the connection unusable
                raise

    async def post(self, path: str, json=None) -> Response:
        return await self.request("POST", path, json)

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def _exchange(self, method: str, path: str, json) -> Response:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        body = b"" if json is None else jsonlib.dumps(json).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self._headers}\r\nContent-Length: {len(body)}\r\n"
        if json is not None:
            head += "Content-Type: application/json\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        response = _ResponseReader()
        while not response.done:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionLost(f"the server closed the connection during {method} {path}")
            response.parser.feed_data(chunk)
        if not response.keep_alive:
            await self.aclose()
        return Response(response.parser.get_status_code(), b"".join(response.body))

    async def aclose(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def __aenter__(self) -> LoopbackClient:
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.aclose()
