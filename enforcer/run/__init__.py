"""The running enforcer's life cycle: start in order, serve, reload, stop; workers and systemd.

``main`` (entry point of ``enforcer run``) → ``daemon`` (one serving process, its tasks in one
TaskGroup) or ``workers`` (a master supervising several); ``attach`` (where a listening socket
and its redirect live: the host today, pods later), ``stores`` (the session store the settings
ask for), ``systemd`` (notify, watchdog), ``memory`` (heap trimming, GC),
``cni`` (the socket the chained CNI plugin announces new pods on; installing the plugin),
``pods`` (pod mode's controller: which pods of the Node are served, enrolled and released).
"""
