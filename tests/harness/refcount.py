"""Switch the cycle collector off around a check that an object is freed by reference counting."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def cycle_collector_off() -> Iterator[None]:
    """No automatic cyclic collection inside the block: whatever is freed there was freed by
    reference counting alone (the collector's previous state is restored after)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
