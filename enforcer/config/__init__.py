"""YAML → frozen typed objects, and where the YAML comes from.

``settings`` (the daemon config, ``enforcer.yaml``), ``definitions`` (services and
httpresourcespecs → :class:`~enforcer.config.definitions.Service`), ``sources`` (files or HTTP,
polled, validated, swapped atomically, last-known-good), ``kubernetes`` (custom resources
watched through the API server, each judged and told its verdict), ``issues`` (every problem with its key
path, value and fix), ``fields`` (shared field types), ``cpus`` (usable CPUs for ``workers: auto``).
"""
