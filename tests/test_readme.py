"""The README and docs/ pages stay true to the code: every printed `enforcer` command parses, every link resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from enforcer.cli import _parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# what may stand before `enforcer` on a printed line: sudo, or running it in a demo namespace
PREFIX = re.compile(r"^(?:\$\s+)?(?:sudo\s+)?(?:ip netns exec \S+\s+)?")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def printed_enforcer_commands(page: Path) -> list[str]:
    """Each `enforcer …` command a page prints: the lines of its sh blocks and the `$ ` lines of its other blocks."""
    commands = []
    for language, body in _blocks(page.read_text(encoding="utf-8")):
        for raw in body.replace("\\\n", " ").splitlines():
            text = raw.strip()
            if language != "sh" and not text.startswith("$ "):
                continue
            command = re.sub(r"\s+#.*$", "", PREFIX.sub("", text, count=1)).strip()
            if command.startswith("enforcer "):
                commands.append(re.split(r"\s+[|>]\s*", command, maxsplit=1)[0])
    return commands


COMMANDS = [(page.relative_to(REPO).as_posix(), cmd) for page in PAGES for cmd in printed_enforcer_commands(page)]


def test_the_pages_print_the_commands_an_operator_needs() -> None:
    """The scan finds check, doctor, rules, flows, explain, reload, certs and demo commands (it is not vacuous)."""
    readme = {cmd.split()[1] for _, cmd in COMMANDS}
    assert {"check", "doctor", "flows", "explain", "reload", "rules", "certs", "demo"} <= readme, readme


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_every_printed_enforcer_command_parses(page: str, command: str) -> None:
    """Each `enforcer` command printed in the README or docs/ is accepted by the CLI's argument parser as printed."""
    try:
        args = _parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` is refused by the CLI (exit {exc.code})")
    assert args.command == command.split()[1]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)}


LINKS = [
    (page, target)
    for page in PAGES
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p.name}->{t}" for p, t in LINKS])
def test_every_relative_link_resolves(page: Path, target: str) -> None:
    """Each relative link of the README and docs/ names a file of the repository, and a heading there when it has an anchor."""
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.name}: {target} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_kubernetes_section_says_what_each_privilege_is_for() -> None:
    """The README's Kubernetes section links the details and has a row for each privilege the DaemonSet holds."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Run it on Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    assert "docs/kubernetes.md" in section
    for privilege in ("hostNetwork", "NET_ADMIN", "NET_BIND_SERVICE", "/var/lib/enforcer", "/var/log/enforcer"):
        assert re.search(rf"^\| [^|]*{re.escape(privilege)}", section, re.MULTILINE), privilege
