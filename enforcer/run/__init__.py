"""The running enforcer's life cycle: start in order, serve, reload, stop; workers and systemd.

``main`` (entry point of ``enforcer run``) → ``daemon`` (one serving process) or ``workers``
(a master supervising several); ``systemd`` (notify, watchdog), ``memory`` (heap trimming, GC).
"""
