"""enforcer: protect a web app with OpenID Connect without touching the app.

A request meets these modules in this order:

1. ``net.ruleset`` / ``net.nftables``  nftables redirect the app's exposed port to our listener
   and block its internal port (``net.sockopt`` reads where a connection was going).
2. ``http.accept``   accept, count against the connection caps, then TLS; ``http.tls`` picks
   the certificate by SNI (``http.certs`` issues them).
3. ``http.fastpath`` the common request (an allowed GET/HEAD with a cached session) on a lean
   HTTP/1.1 path; any other request goes to ``http.server`` (aiohttp) and
4. ``http.plan``     route → canonical path → own endpoints → session → decide (pure, one
   plan for both paths, asked through ``http.gate``); ``http.relay`` acts on it.
5. ``identity``      who is asking: ``cookies`` → ``sessions`` (``sqlite``, ``cache``), or an
   OpenID Connect login (``login``, ``oidc``, checked by ``tokens``).
6. ``policy``        decide(): canonical path + method + tags → allow / deny / login.
7. ``http.proxy``    forward to the app through ``http.upstream``, headers by ``http.headers``;
   ``http.pages`` for what the enforcer answers itself.
8. ``flow`` / ``flowlog``  exactly one flow record per request, written off the hot path.

Packages, top to bottom (each imports only from those below it; checked by import-linter):

- ``cli``       subcommands: ``enforcer run|check|flows|explain|doctor|rules|reload|block|unblock|demo``.
- ``run``       life cycle: daemon, attachments, worker processes, systemd, memory.
- ``http``      the data path over HTTP/1.1.
- ``identity``  sessions and OpenID Connect.      ``config``  YAML → frozen typed objects.
- ``flowlog``, ``metrics``                        writing flow records and metrics.
- ``policy``, ``flow``, ``net``                   pure decisions, the flow record, Linux networking.
- ``errors``    the error vocabulary.
"""

__version__ = "0.1.0"
