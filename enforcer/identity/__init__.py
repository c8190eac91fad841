"""Who is asking: cookies, sessions and their stores, OpenID Connect logins and token checks.

``cookies`` and ``tokens`` are pure; ``sessions`` holds the store seam and the memory store,
``sqlite`` and ``cache`` the default store, ``redis`` the store a fleet of enforcers shares,
``crypto`` seals refresh tokens at rest (AES-GCM, rotating keys), ``login`` the login and refresh
rules and transactions, ``oidc`` the Provider (with ``redis`` the only modules here that do
network I/O).
"""
