"""enforcer: protect a web app with OpenID Connect without touching the app.

The data path, in the order a request meets it (one module per step):

1. ``redirect``  nftables rules send connections for the app's exposed port to us.
2. ``listener``  TLS (self-issued certificate from ``certs``), SNI picks the service.
3. ``fastpath``  the common request (an allowed GET/HEAD with a cached session) served on a
                 lean HTTP/1.1 path; any other request hands the connection to aiohttp and
4. ``handler``   the request path, top to bottom, in one readable function.
5. ``session`` / ``oidc``  who is this? session handle cookie, or an OpenID Connect login.
6. ``policy``    decide(): canonical path + method + tags -> allow / deny / login.
7. ``proxy``     forward allowed requests to the app's internal port (streaming).
8. ``flowlog``   exactly one flow record per request.

Around it: ``config`` (YAML -> frozen typed objects), ``metrics`` (prometheus),
``daemon`` (lifecycle and signals), ``cli`` (subcommands), ``demo`` (local IdP + app).
"""

__version__ = "0.1.0"
