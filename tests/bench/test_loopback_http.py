"""The load benchmark's lean HTTP client (bench/loopback_http.py), checked against httpx on
the same requests to a real uvicorn server: same status, same body, one connection kept
across requests, and a clear error when the server hangs up or never answers."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.loopback_http import ConnectionLost, LoopbackClient


async def echo(request: Request) -> JSONResponse:
    body = await request.body()  # parsed: the two clients may space and escape JSON differently
    return JSONResponse({"method": request.method, "json": json.loads(body) if body else None, "type": request.headers.get("content-type"),
                         "auth": request.headers.get("authorization")}, status_code=201)


async def chunked(_request: Request) -> StreamingResponse:
    async def parts():
        for part in (b"first,", b"second,", b"third"):
            yield part
            await asyncio.sleep(0.01)

    return StreamingResponse(parts(), media_type="text/plain")


async def peer(request: Request) -> JSONResponse:
    return JSONResponse({"port": request.client.port})


APP = Starlette(routes=[
    Route("/echo", echo, methods=["GET", "POST"]),
    Route("/chunked", chunked),
    Route("/peer", peer),
    Route("/missing", lambda _r: JSONResponse({"detail": "no such thing", "text": "żółw"}, status_code=404)),
    Route("/empty", lambda _r: Response(status_code=204)),
    Route("/close", lambda _r: Response(b"bye", headers={"Connection": "close"})),
])


@pytest.fixture(scope="module")
def server_url():
    server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


REQUESTS = [
    ("GET", "/echo", None),
    ("POST", "/echo", {"model": "bundled:smollm2-135m", "n": [1, 2.5, None], "text": "naïve"}),
    ("POST", "/echo", None),
    ("GET", "/missing", None),
    ("GET", "/empty", None),
    ("GET", "/chunked", None),
    ("GET", "/nowhere", None),
]


def test_answers_match_httpx(server_url):
    headers = {"Authorization": "Bearer k"}

    async def both():
        async with LoopbackClient(server_url, headers) as lean, httpx.AsyncClient(base_url=server_url, headers=headers) as reference:
            for method, path, body in REQUESTS:
                got = await lean.request(method, path, json=body)
                expected = await reference.request(method, path, json=body)
                assert (got.status_code, got.content) == (expected.status_code, expected.content), (method, path)
                if expected.headers.get("content-type") == "application/json":
                    assert got.json() == expected.json()

    asyncio.run(both())


def test_one_connection_serves_every_request_until_the_server_closes_it(server_url):
    async def ports():
        async with LoopbackClient(server_url) as client:
            first = [(await client.get("/peer")).json()["port"] for _ in range(5)]
            assert (await client.get("/close")).content == b"bye"
            after = (await client.get("/peer")).json()["port"]
            return first, after

    first, after = asyncio.run(ports())
    assert len(set(first)) == 1 and after != first[0]


async def _serve_raw(answer: bytes):
    """A server that reads a request, writes `answer` and hangs up (or, for b'', never answers)."""

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        if not answer:
            await asyncio.sleep(3600)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_response_cut_short_is_an_error_not_an_answer():
    async def run():
        server = await _serve_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        port = server.sockets[0].getsockname()[1]
        async with server, LoopbackClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(ConnectionLost):
                await client.get("/")

    asyncio.run(run())


def test_a_server_that_never_answers_times_out():
    async def run():
        server = await _serve_raw(b"")
        port = server.sockets[0].getsockname()[1]
        async with server, LoopbackClient(f"http://127.0.0.1:{port}", timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.get("/")
            assert time.monotonic() - started < 5
            server.close()

    asyncio.run(run())


def test_only_plain_http_urls():
    with pytest.raises(ValueError, match="plain http"):
        LoopbackClient("https://127.0.0.1:8443")
