"""enforcer: protect a web app with OpenID Connect without touching the app.

The data path, in the order a request meets it (one module per step):

1. ``redirect``  nftables rules send connections for the app's exposed port to us.
2. ``listener``  TLS (self-issued certificate from ``certs``), SNI picks the service.
3. ``handler``   the request path, top to bottom, in one readable function.
4. ``session`` / ``oidc``  who is this? session handle cookie, or an OpenID Connect login.
5. ``policy``    decide(): canonical path + method + tags -> allow / deny / login.
6. ``proxy``     forward allowed requests to the app's internal port (streaming).
7. ``flowlog``   exactly one flow record per request.

Around it: ``config`` (YAML -> frozen typed objects), ``metrics`` (prometheus),
``daemon`` (lifecycle and signals), ``cli`` (subcommands), ``demo`` (local IdP + app).
"""

__version__ = "0.1.0"
