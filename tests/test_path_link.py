"""scripts/path-link (run by scripts/setup and scripts/install) puts one checkout's `enforcer` on PATH."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "path-link"


def _program(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho enforcer\n")
    path.chmod(0o755)
    return path


def _link(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENFORCER_BIN_DIR": str(tmp / "bin")}
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False)


def _nothing(_: Path) -> None:
    """BINDIR has no enforcer."""


def _ours(tmp: Path) -> None:
    (tmp / "bin").mkdir()
    (tmp / "bin" / "enforcer").symlink_to(tmp / "this" / ".venv" / "bin" / "enforcer")


def _other_checkout(tmp: Path) -> None:
    (tmp / "bin").mkdir()
    (tmp / "bin" / "enforcer").symlink_to(_program(tmp / "other" / ".venv" / "bin" / "enforcer"))


def _gone_checkout(tmp: Path) -> None:
    (tmp / "bin").mkdir()
    (tmp / "bin" / "enforcer").symlink_to(tmp / "deleted" / ".venv" / "bin" / "enforcer")


def _regular_file(tmp: Path) -> None:
    _program(tmp / "bin" / "enforcer")


# (what BINDIR holds before, --force, where bin/enforcer leads afterwards: "this", "other" or "file")
CASES: list[tuple[Callable[[Path], None], bool, str]] = [
    (_nothing, False, "this"),
    (_ours, False, "this"),
    (_gone_checkout, False, "this"),
    (_other_checkout, False, "other"),
    (_other_checkout, True, "this"),
    (_regular_file, False, "file"),
    (_regular_file, True, "file"),
]


@pytest.mark.parametrize(("before", "force", "after"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_the_link_belongs_to_one_checkout(
    tmp_path: Path, before: Callable[[Path], None], force: bool, after: str
) -> None:
    """The link is made when absent or dangling, kept when another live enforcer owns it (unless --force)."""
    target = _program(tmp_path / "this" / ".venv" / "bin" / "enforcer")
    before(tmp_path)
    done = _link(tmp_path, str(target), *(["--force"] if force else []))
    assert done.returncode == 0, done.stderr
    link = tmp_path / "bin" / "enforcer"
    if after == "file":
        assert not link.is_symlink()
        assert "not a symlink" in done.stdout
    else:
        assert link.is_symlink()
        assert link.resolve() == (tmp_path / after / ".venv" / "bin" / "enforcer").resolve()
        assert str(target if after == "this" else link.resolve()) in done.stdout


def test_links_inside_another_root(tmp_path: Path) -> None:
    """With --root the link is made in that root and points at the path as seen from inside it."""
    root = tmp_path / "image"
    _program(root / "opt" / "enforcer" / "venv" / "bin" / "enforcer")
    env = {**os.environ, "ENFORCER_BIN_DIR": "/usr/local/bin"}
    done = subprocess.run(
        [str(SCRIPT), "/opt/enforcer/venv/bin/enforcer", "--force", "--root", str(root)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.readlink(root / "usr" / "local" / "bin" / "enforcer") == "/opt/enforcer/venv/bin/enforcer"


def test_an_unwritable_bindir_tells_what_to_add_to_path(tmp_path: Path) -> None:
    """When BINDIR cannot be created the script still succeeds and names the directory to add to PATH."""
    target = _program(tmp_path / "this" / ".venv" / "bin" / "enforcer")
    (tmp_path / "bin").write_text("a file where the directory should be")
    done = _link(tmp_path, str(target))
    assert done.returncode == 0, done.stderr
    assert f"add {target.parent} to PATH" in done.stdout
