"""The data path over HTTP/1.1: accept, TLS, the two HTTP paths, the gate, the proxy, the pages.

``accept`` (connection caps before TLS) → ``tls`` (SNI picks the certificate; ``certs`` makes
them) → ``fastpath`` (the lean path for the common request) or ``server`` (aiohttp) → ``gate``
(route, canonicalise, session, decide) → ``proxy`` (forward through the ``upstream`` pool, with
``headers`` hygiene) → ``pages`` (what the enforcer itself answers).
"""
