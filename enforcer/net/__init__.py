"""Linux networking: the nftables redirect, socket options and network namespaces.

``ruleset`` (pure data), ``nftables`` (netlink via pyroute2), ``sockopt`` (original
destination, ``SO_MARK``), ``netns`` (run code inside another network namespace), ``pods``
(find a pod's network namespace from /proc and hold it; pyroute2 for its addresses). Never imports aiohttp.
"""
