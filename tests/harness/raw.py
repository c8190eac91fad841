"""A raw HTTP/1.1 client over TLS for attack tests: it writes exact bytes and parses answers by hand.

Not a mock: a real TLS connection to the real stack (see :mod:`tests.e2e_stack`); nothing
normalises what is sent, so malformed request lines and headers reach the enforcer as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from tests.harness.e2e_stack import HOST, Stack


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Raw:
    """One TLS connection that writes exact bytes and parses HTTP/1.1 answers by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, stack: Stack, *, sni: str = HOST, ctx: ssl.SSLContext | None = None,
                   source: str | None = None) -> Raw:
        """Connect (from the loopback address ``source``, e.g. 127.0.0.2, if given) and handshake."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.port, ssl=ctx or stack.client_ssl(), server_hostname=sni, limit=1 << 22,
            local_addr=(source, 0) if source else None,
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, head: bool = False, timeout: float = 10.0) -> Reply | None:
        """The next response, or None if the connection ended first."""
        try:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
        rep = Reply(status, headers, b"", raw)
        if head or status in (204, 304) or status < 200:
            return rep
        if "chunked" in ",".join(rep.header("Transfer-Encoding")).lower():
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                rep.body += (await self.reader.readexactly(size + 2))[:-2]
        elif rep.header("Content-Length"):
            rep.body = await asyncio.wait_for(self.reader.readexactly(int(rep.header("Content-Length")[0])), timeout)
        else:
            rep.body = await asyncio.wait_for(self.reader.read(), timeout)
        return rep

    async def closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within ``timeout`` (and sends nothing more)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def request(first: str, *headers: str, host: str | None = HOST, body: bytes = b"", port: int | None = None) -> bytes:
    """Exact request bytes: request-line, Host (unless None), the given header lines, CRLF, body."""
    lines = [first]
    if host is not None:
        lines.append(f"Host: {host}" + (f":{port}" if port else ""))
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
