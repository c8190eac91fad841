"""Run a callable inside another network namespace without ever moving the caller's threads.

:func:`run_in_netns` runs a callable in a throw-away thread that ``setns()``-es into the target
namespace: how pod mode and the tests reach a namespace. Sockets keep the namespace they were
created in, so a socket made there can be used from anywhere.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


_CLONE_NEWNET = 0x40000000
def _netns_path(netns: str) -> str:
    return netns if "/" in netns else f"/run/netns/{netns}"


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` inside network namespace ``netns`` and return its result.

    ``netns`` is a name under /run/netns (``ip netns add``) or a path such as
    ``/proc/<pid>/ns/net``; None runs ``fn`` right here. A fresh thread enters the namespace and
    ends with ``fn``, so no thread of the caller ever changes namespace. Sockets created by ``fn``
    stay in that namespace and can be used from anywhere. A missing namespace raises
    FileNotFoundError (it is never created). Needs CAP_SYS_ADMIN.
    """
    if netns is None:
        return fn(*args, **kwargs)
    fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    try:
        thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


