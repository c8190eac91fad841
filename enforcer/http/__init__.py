"""The data path over HTTP/1.1: accept, TLS, the two HTTP paths, one plan, one act, the proxy.

``accept`` (connection caps before TLS) → ``tls`` (SNI picks the certificate; ``certs`` makes
them; the connection's facts are read once, with its listener's ``scope``: a pod's services and
upstream pool) → ``fastpath`` (the lean path for the common
request) or ``server`` (aiohttp) → both ask ``plan`` (pure: route, canonicalise, own endpoints,
cached session, decide) through the ``gate``, which also runs the login, callback and logout
endpoints → ``relay`` (the act both paths share: flow record, failure → reason/page/metric,
body relay) → ``proxy`` (forward through the ``upstream`` pool, with ``headers`` hygiene) →
``pages`` (what the enforcer itself answers). ``scope`` (a pod listener's services and upstream pool).
``probes``: a pod's probe gate, apart from all that (only the kubelet's plain-HTTP probes of a
protected port, from the node's address, reach the pod's app through it).
"""
