"""Floor servers for scripts/bench: what Python on uvloop costs before any enforcer logic.

Three reference servers, each TLS on loopback with the bench's certificate, each answering
every request with the upstream's body (``BENCH_BODY``; so the bench's validity checks apply):

* ``raw``     -- an httptools protocol that writes a fixed response (the transport floor);
* ``aiohttp`` -- aiohttp's low-level ``web.Server`` returning the same body (what aiohttp's
  server machinery adds);
* ``proxy``   -- the httptools protocol forwarding each request through the enforcer's own
  upstream pool (:mod:`enforcer.upstream`) to the bench upstream and relaying the body back:
  a lean proxy path without policy, sessions, header hygiene, flow log or metrics.

They answer the question the speed issue asks before a leaner server path is built: how much
of the enforcer's cost per request is the server stack and how much its own request path.
Not a product: no limits, no hygiene, loopback only.

    python scripts/bench_floor.py raw|aiohttp|proxy PORT CERT KEY [UPSTREAM_PORT]
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys

import httptools
import uvloop
from aiohttp import web

from enforcer.http import upstream

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
CLOSE = b"Connection: close\r\n"


class Fixed(asyncio.Protocol):
    """One connection of the ``raw`` server (or, with a pool, of the ``proxy`` server)."""

    def __init__(self, body: bytes, pool: upstream.Pool | None = None, upstream_port: int = 0) -> None:
        self.body = body
        self.pool = pool
        self.upstream_port = upstream_port
        self.url = b""
        self.queue: asyncio.Queue[tuple[bytes, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's SSL transport
        self.parser = httptools.HttpRequestParser(self)
        if self.pool is not None:
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self.relay())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pool is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        if self.queue is not None:
            self.queue.put_nowait((self.url, keep))
            return
        self.transport.write(HEAD % (len(self.body), b"" if keep else CLOSE) + self.body)
        if not keep:
            self.transport.close()

    async def relay(self) -> None:
        """Requests of this connection in order: through the pool to the upstream and back."""
        assert self.queue is not None
        assert self.pool is not None
        while True:
            url, keep = await self.queue.get()
            conn = await self.pool.acquire("127.0.0.1", self.upstream_port)
            conn.start(b"GET " + url + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", no_body=False)
            await conn.response()
            body = b""
            while chunk := await conn.read():
                body += chunk
            conn.finish(True)
            self.transport.write(HEAD % (len(body), b"" if keep else CLOSE) + body)
            if not keep:
                self.transport.close()
                return


async def serve(mode: str, port: int, cert: str, key: str, upstream_port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    body = os.environ.get("BENCH_BODY", "x" * 100).encode()
    loop = asyncio.get_running_loop()
    if mode == "raw":
        await loop.create_server(lambda: Fixed(body), "127.0.0.1", port, ssl=ctx)
    elif mode == "aiohttp":

        async def handler(_: web.BaseRequest) -> web.Response:
            return web.Response(body=body, content_type="text/plain")

        await loop.create_server(web.Server(handler, access_log=None), "127.0.0.1", port, ssl=ctx)
    elif mode == "proxy":
        pool = upstream.Pool(connect_timeout=5, read_timeout=30, limit_per_host=256)
        await loop.create_server(lambda: Fixed(body, pool, upstream_port), "127.0.0.1", port, ssl=ctx)
    else:
        raise SystemExit(f"unknown mode {mode!r}: raw, aiohttp or proxy")
    await asyncio.Event().wait()


def main() -> None:
    mode, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    upstream_port = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    uvloop.run(serve(mode, port, cert, key, upstream_port))


if __name__ == "__main__":
    main()
