"""A fake :class:`enforcer.run.attach.Redirector`: records the rulesets applied and the tables removed."""

from __future__ import annotations

from dataclasses import dataclass, field

from enforcer.net.ruleset import RedirectError, Ruleset


@dataclass
class FakeRedirector:
    """Records the rulesets applied and the tables removed; refuses when told to."""

    applied: list[Ruleset] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refuse: bool = False

    async def apply(self, ruleset: Ruleset) -> None:
        if self.refuse:
            raise RedirectError("refused by the fake")
        self.applied.append(ruleset)

    async def remove(self, table: str) -> bool:
        if self.refuse:
            raise RedirectError("refused by the fake")
        self.removed.append(table)
        return True
