"""Who is asking: cookies, sessions and their stores, OpenID Connect logins and token checks.

``cookies`` and ``tokens`` are pure; ``sessions`` holds the store seam and the memory store,
``sqlite`` and ``cache`` the default store, ``login`` the login transactions, ``oidc`` the
Provider (the only module here that does network I/O).
"""
