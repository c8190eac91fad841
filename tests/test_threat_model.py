"""THREAT_MODEL.md stays true to the suite: every test it cites exists, every threat has evidence or a reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "THREAT_MODEL.md"
TEXT = DOC.read_text(encoding="utf-8")

#: ``tests/<file>.py::<function>``, as the evidence column writes it.
REFERENCE = re.compile(r"\b(tests/[A-Za-z0-9_/]+\.py)::([A-Za-z_][A-Za-z0-9_]*)")
REFERENCES = sorted(set(REFERENCE.findall(TEXT)))

BOUNDARIES = (
    "## 1. Browser ↔ enforcer",
    "## 2. Enforcer ↔ identity provider",
    "## 3. Enforcer ↔ app",
    "## 4. Operator ↔ control plane",
    "## 5. Node ↔ pods (Kubernetes)",
)
STRIDE = {"S", "T", "R", "I", "D", "E"}
#: A row without a cited test must say why: still open (with its issue), accepted, or not built yet.
REASON = re.compile(r"\b(open, #1[5-9]|accepted|not built)\b")


def _section(heading: str) -> str:
    start = TEXT.index(heading)
    end = TEXT.find("\n## ", start + len(heading))
    return TEXT[start : end if end != -1 else len(TEXT)]


def _threat_rows(section: str) -> list[list[str]]:
    """The body rows of the section's table, split into cells (header and separator rows left out)."""
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    return [c for c in cells if c[0] != "threat" and not set("".join(c)) <= set("-: ")]


def test_the_document_cites_tests() -> None:
    """The threat model cites well over a hundred distinct tests as evidence (the parser finds them)."""
    assert len(REFERENCES) > 100, REFERENCES


@pytest.mark.parametrize(("path", "name"), REFERENCES, ids=[f"{p}::{n}" for p, n in REFERENCES])
def test_every_cited_test_exists(path: str, name: str) -> None:
    """Each ``tests/<file>.py::<name>`` the threat model cites is a file holding ``def <name>(``."""
    source = REPO / path
    assert source.is_file(), f"THREAT_MODEL.md cites {path}, which does not exist"
    assert re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", source.read_text(encoding="utf-8"), re.MULTILINE), (
        f"THREAT_MODEL.md cites {path}::{name}, which is not defined there"
    )


@pytest.mark.parametrize("heading", BOUNDARIES)
def test_every_boundary_has_a_stride_table(heading: str) -> None:
    """Each of the five trust boundaries has a section whose table gives every threat a STRIDE class."""
    rows = _threat_rows(_section(heading))
    assert rows, f"{heading}: no threat table"
    bad = [row[0] for row in rows if len(row) != 4 or not set(row[1].split("/")) <= STRIDE]
    assert not bad, f"{heading}: rows without a STRIDE class: {bad}"


@pytest.mark.parametrize("heading", BOUNDARIES)
def test_every_threat_has_evidence_or_a_reason(heading: str) -> None:
    """A threat row either cites a test or says it is open (naming the issue), accepted, or not built."""
    rows = _threat_rows(_section(heading))
    bare = [row[0] for row in rows if not REFERENCE.search(" ".join(row)) and not REASON.search(" ".join(row))]
    assert not bare, f"{heading}: threats with neither a test nor a reason: {bare}"


def test_issue_19_items_named_exist() -> None:
    """Every "#19 item N" points at one of the issue's six items."""
    items = {int(n) for n in re.findall(r"#19 items? (\d+)", TEXT)}
    assert items, "the open weaknesses of issue 19 are named by item"
    assert items <= set(range(1, 7)), items


def test_the_readme_links_the_threat_model() -> None:
    """The README points readers at THREAT_MODEL.md."""
    assert "THREAT_MODEL.md" in (REPO / "README.md").read_text(encoding="utf-8")
