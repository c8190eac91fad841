"""Field types shared by the daemon config and the definitions: durations, names, hosts, tags."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
)

# ---------------------------------------------------------------------------
# small value parsers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``30`` / ``"30s"`` / ``"10m"`` / ``"8h"`` / ``"1d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 10m, 8h or 1d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration such as 30s, 10m, 8h or 1d (not negative)")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("a duration such as 30s, 10m, 8h or 1d")


Duration = Annotated[float, BeforeValidator(parse_duration)]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TAG = re.compile(r"^[^\s=]+=\S*$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def normalise_host(host: str) -> str:
    """Lower-case, drop one trailing dot; IP literals in canonical form."""
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


def _check_host(host: str) -> str:
    h = normalise_host(host)
    try:
        ipaddress.ip_address(h)
        return h
    except ValueError:
        pass
    labels = h.split(".")
    if len(h) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError("a DNS name such as app.example.com (letters, digits, '-', dots)")
    return h


def _check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise ValueError("a tag of the form key=value without spaces, e.g. app=frontend")
    return tag


Tag = Annotated[str, BeforeValidator(lambda v: _check_tag(v) if isinstance(v, str) else v)]
TagExpression = list[list[Tag]]  # OR of ANDs


def tags_match(expression: Sequence[Sequence[str]], tags: Iterable[str]) -> bool:
    """True if one inner list of ``expression`` is contained in ``tags``."""
    have = set(tags)
    return any(set(clause) <= have for clause in expression)


# ---------------------------------------------------------------------------
# definitions (kind: service / kind: httpresourcespec)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

