"""A protected app for namespace tests: records every request it receives to a JSON-lines file.

    python tests/recording_app.py RECORD_FILE NAME:PORT [NAME:PORT ...]

Each NAME:PORT is one app listening on ``[::]:PORT`` (dual-stack, every address, as a typical
app binds: only the enforcer's port block keeps outsiders away). Every request appends
``{"app", "method", "path", "headers", "peer"}`` to RECORD_FILE and is answered with JSON naming
the app. Prints ``ready`` once all apps listen.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

from aiohttp import web


def make_app(name: str, record: Path) -> web.Application:
    async def any_request(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        row = {
            "app": name,
            "method": request.method,
            "path": request.raw_path,
            "headers": list(request.headers.items()),
            "peer": str(peer[0]) if peer else None,
        }
        with record.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return web.json_response({"app": name, "path": request.raw_path, "user": request.headers.get("X-Forwarded-User")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    return app


async def main(record: Path, specs: list[str]) -> None:
    runners = []
    for spec in specs:
        name, port = spec.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", int(port)))
        runner = web.AppRunner(make_app(name, record), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2:]))
