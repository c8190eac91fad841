"""A fake :class:`enforcer.run.pods.Enrolment` (the daemon's side of pod mode): serves attachments as
the daemon does and records every call."""

from __future__ import annotations

from dataclasses import dataclass, field

from enforcer.config import definitions as definitions_mod
from enforcer.run.attach import PodAttachment


@dataclass
class FakeSink:
    """Serves attachments as the daemon does (applies the definitions in force; the listener is
    not opened: no namespace is entered here) and records each add and remove; refuses adds when
    told to."""

    definitions: definitions_mod.Definitions
    calls: list[tuple[str, str, object]] = field(default_factory=list)
    refuse: bool = False

    async def add_attachment(self, attachment: PodAttachment) -> None:
        if self.refuse:
            raise RuntimeError("refused by the fake")
        await attachment.apply(self.definitions)
        self.calls.append(("add", attachment.name, tuple(s.name for s in attachment.services)))

    async def remove_attachment(self, attachment: PodAttachment, *, release: bool) -> None:
        self.calls.append(("remove", attachment.name, release))
        if release:
            await attachment.release()
        else:
            attachment.close()
