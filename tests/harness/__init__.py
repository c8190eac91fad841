"""Test harness: a real OpenID Provider (node oidc-provider), a scripted HTTP
browser and a headless Chromium driver, shared by end-to-end tests and the demo.

Only the runtime dependencies (aiohttp, cryptography) are imported here.
"""
