"""Test harness: a real OpenID Provider (node oidc-provider), a scripted HTTP
browser, a headless Chromium driver, a raw TLS client for attack inputs and the seed
definitions, shared by the tests (which never import each other) and the demo.

Only the runtime dependencies (aiohttp, cryptography) are imported by what the demo
uses (``op`` and ``browser``).
"""
