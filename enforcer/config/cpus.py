"""How many CPUs this process may use: affinity and the cgroup CPU quota (v1 and v2)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# ---------------------------------------------------------------------------
# daemon config (enforcer.yaml)

MAX_WORKERS = 64


def _quota_v2(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` in a cgroup v2 directory (None: no file, ``max`` or junk)."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0 and int(quota) > 0:
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    return None


def _quota_v1(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (cgroup v1; -1: none)."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _with_ancestors(mount: Path, path: str) -> list[Path]:
    """``mount``/``path`` and each parent up to ``mount`` itself (a parent's quota binds too)."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The CPU quota that binds this process, in CPUs: the smallest along its own cgroup and
    its ancestors, cgroup v2 (``cpu.max``: a Kubernetes CPU limit, systemd ``CPUQuota=``) or
    v1 (``cpu.cfs_quota_us``); None when there is none or it cannot be read.

    The path comes from ``/proc/self/cgroup``; inside a container whose cgroup is mounted at
    the root of ``/sys/fs/cgroup`` (a cgroup namespace, or Docker's v1 bind mount) the mount
    root itself is read too, so a path that only makes sense on the host does no harm."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            found = [_quota_v2(d) for d in _with_ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            found = [_quota_v1(d) for m in dict.fromkeys(mounts) for d in _with_ancestors(m, path)]
        else:
            continue
        limits.extend(q for q in found if q is not None)
    return min(limits) if limits else None


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process can keep busy: its CPU affinity (taskset, cpuset), lowered to the
    cgroup CPU quota rounded up (:func:`cgroup_cpu_limit`: a Kubernetes CPU limit of 1500m
    gives 2), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(proc_cgroup, root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def resolve_workers(value: object) -> object:
    """``listen.workers`` / ``--workers``: ``auto`` becomes :func:`usable_cpus` (at most
    MAX_WORKERS); anything else is left for the int check."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return min(MAX_WORKERS, usable_cpus())
        if not text.isdigit():
            raise ValueError(f"must be a number from 1 to {MAX_WORKERS}, or auto (one per usable CPU)")
    return value


