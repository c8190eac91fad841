"""The seed objects of the product guide: one ``service`` and the ``httpresourcespec`` it exposes.

Plain dicts, as a definitions file holds them; tests copy and change them (``{**SPEC, ...}``).
"""

from __future__ import annotations

SERVICE = {
    "kind": "service",
    "name": "private-app",
    "authorizationType": "OIDC",
    "OIDCClientID": "0oannpib3fQEeUWzD4x6",
    "OIDCClientSecret": "qcnc1ZFABmwmFwFZD_BAffNRFUn5aYQhvrx4XsxU",
    "OIDCProviderURL": "https://idp.example.com/oauth2/default",
    "OIDCCallbackURL": "https://app.example.com",
    "OIDCScopes": ["email", "openid"],
    "hosts": ["app.example.com"],
    "port": 80,
    "exposedPort": 443,
    "selectors": [["app=frontend", "$identity=processingunit"]],
    "associatedTags": ["service:name=nginx"],
    "type": "HTTP",
    "exposedAPIs": [["httpresourcespec:name=private-app"]],
    "propagate": True,
}
SPEC = {
    "kind": "httpresourcespec",
    "name": "nginx",
    "endpoints": [{"URI": "/*", "methods": ["GET"], "public": False, "allowedScopes": [["email=alice@example.com"]]}],
    "associatedTags": ["httpresourcespec:name=private-app"],
    "propagate": True,
}
