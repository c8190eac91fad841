"""Linux networking: the nftables redirect, socket options and network namespaces.

``ruleset`` (pure data), ``nftables`` (netlink, the only pyroute2 user), ``sockopt`` (original
destination, ``SO_MARK``), ``netns`` (run code inside another network namespace), ``pods``
(find a pod's network namespace from /proc and hold it). Never imports aiohttp.
"""
