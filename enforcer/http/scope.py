"""What one pod's listener serves: only its own services, only through its own upstream pool.

One daemon serves many pods, each on its own listening socket inside the pod's network
namespace. A :class:`Scope` is made once per such listener and handed to each of its
connections once, at the accept (:attr:`enforcer.http.tls.ConnectionInfo.scope`); the request
path reads it only where it already routes (:meth:`enforcer.http.gate.Gate.plan`: the scope's
hosts and port instead of the daemon's, and a name outside the scope is an unknown host) and
where it already forwards (the scope's upstream pool, whose sockets are made inside the pod's
namespace, instead of the daemon's). The host's listener hands out None: today's code, with
nothing more per request than that one ``is None``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from enforcer.config.definitions import Service
    from enforcer.http.gate import Upstream


class Scope:
    """One pod listener's services (``by_host``, replaced whole by :meth:`serve`), its port
    and its upstream pool. ``name`` names the pod in logs."""

    __slots__ = ("by_host", "listen_port", "name", "upstream")

    def __init__(self, name: str, listen_port: int, upstream: Upstream, services: Iterable[Service] = ()) -> None:
        self.name = name
        self.listen_port = listen_port
        self.upstream = upstream
        self.by_host: dict[str, Service] = {}
        self.serve(services)

    def serve(self, services: Iterable[Service]) -> None:
        """Serve these services from now on (one assignment: a request sees the old set or the new)."""
        self.by_host = {host: svc for svc in services for host in svc.hosts}

    def __repr__(self) -> str:
        return f"Scope({self.name!r}, port {self.listen_port}, {sorted({s.name for s in self.by_host.values()})})"
