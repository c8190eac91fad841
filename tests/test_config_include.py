"""``include:`` in enforcer.yaml: drop-in files merged over it, and problems named by the file
that set the value (enforcer/config/settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.config import settings as settings_mod
from enforcer.config.issues import ConfigIssue

MAIN = "definitions: [{file: defs.yaml}]\nlisten: {port: 8443, workers: 1}\nsessions: {idleTimeout: 1h}\n"


def _write(d: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (d / name).write_text(text)
    return d / "enforcer.yaml"


def _read(d: Path, files: dict[str, str]) -> tuple[settings_mod.Settings | None, list[ConfigIssue]]:
    return settings_mod.read_settings(_write(d, files))


def test_drop_ins_merge_mappings_key_by_key_in_glob_order(tmp_path: Path) -> None:
    """Drop-ins matched by a glob are merged in name order: a mapping keeps the keys they do not set, a later file wins."""
    settings, issues = _read(tmp_path, {
        "enforcer.yaml": "include: ['enforcer.*.yaml']\n" + MAIN,
        "enforcer.a.yaml": "listen: {port: 9443}\nsessions: {absoluteTimeout: 2h}\n",
        "enforcer.b.yaml": "listen: {port: 10443}\n",
    })
    assert issues == []
    assert settings is not None
    assert settings.model.listen.port == 10443
    assert settings.model.listen.workers == 1  # from the main file, not replaced by the drop-ins' listen
    assert (settings.model.sessions.idleTimeout, settings.model.sessions.absoluteTimeout) == (3600, 7200)


def test_a_list_in_a_drop_in_replaces_the_main_files_list(tmp_path: Path) -> None:
    """Lists are not concatenated: a drop-in's tags replace the main file's tags."""
    settings, issues = _read(tmp_path, {
        "enforcer.yaml": "include: [extra.yaml]\ntags: [a=1, b=2]\n" + MAIN,
        "extra.yaml": "tags: [c=3]\n",
    })
    assert issues == [] and settings is not None
    assert settings.model.tags == ["c=3"]


def test_a_bad_value_from_a_drop_in_names_the_drop_in_and_the_key_path(tmp_path: Path) -> None:
    """A refused value names the drop-in it came from, with its key path; a bad value of the main file still names the main file."""
    _, issues = _read(tmp_path, {
        "enforcer.yaml": "include: [enforcer.sessions.yaml]\nadmin: {address: 0.0.0.0}\n" + MAIN,
        "enforcer.sessions.yaml": "sessions: {store: redis, redis: {url: 'http://x'}}\n",
    })
    where = {i.path: i.source for i in issues}
    assert where["sessions.redis"] == str(tmp_path / "enforcer.sessions.yaml"), issues
    assert where["admin.address"] == str(tmp_path / "enforcer.yaml"), issues


def test_an_unknown_key_in_a_drop_in_is_an_error_naming_it(tmp_path: Path) -> None:
    """A typo'd key in a drop-in is refused with the did-you-mean, naming the drop-in."""
    _, issues = _read(tmp_path, {
        "enforcer.yaml": "include: [x.yaml]\n" + MAIN,
        "x.yaml": "sesions: {store: redis}\n",
    })
    [issue] = issues
    assert issue.source == str(tmp_path / "x.yaml") and issue.path == "sesions"
    assert "sessions" in str(issue)


def test_a_missing_named_file_is_an_issue_and_an_unmatched_glob_is_not(tmp_path: Path) -> None:
    """A literal include path that does not exist is an issue at include[i]; a glob that matches nothing is fine."""
    settings, issues = _read(tmp_path, {"enforcer.yaml": "include: ['none.*.yaml', gone.yaml]\n" + MAIN})
    assert settings is not None
    assert [(i.path, i.value) for i in issues] == [("include[1]", "gone.yaml")]


@pytest.mark.parametrize(("text", "path", "needle"), [
    ("include: [more.yaml]\nlisten: {port: 1}\n", "include", "cannot include"),
    ("- listen\n- admin\n", "", "one YAML mapping"),
    ("listen: {port: [\n", "line 2, column 1", "invalid YAML"),
])
def test_a_broken_drop_in_is_an_issue_naming_it(tmp_path: Path, text: str, path: str, needle: str) -> None:
    """A drop-in that includes more files, is not a mapping, or is not YAML is refused, naming the drop-in."""
    _, issues = _read(tmp_path, {"enforcer.yaml": "include: [d.yaml]\n" + MAIN, "d.yaml": text, "more.yaml": ""})
    mine = [i for i in issues if i.source == str(tmp_path / "d.yaml")]
    assert mine and mine[0].path == path and needle in mine[0].message, issues


def test_the_config_itself_and_a_file_matched_twice_are_read_once(tmp_path: Path) -> None:
    """A glob that also matches enforcer.yaml does not merge it over itself, and a drop-in two patterns match is merged once."""
    settings, issues = _read(tmp_path, {
        "enforcer.yaml": "include: ['*.yaml', z.yaml]\n" + MAIN,
        "defs.yaml": "",
        "z.yaml": "tags: [z=1]\n",
    })
    assert issues == [] and settings is not None
    assert settings.model.tags == ["z=1"]


def test_relative_paths_in_a_drop_in_are_relative_to_the_configs_folder(tmp_path: Path) -> None:
    """A relative secret file set by a drop-in in another folder resolves against enforcer.yaml's folder."""
    (tmp_path / "conf.d").mkdir()
    settings, issues = _read(tmp_path, {
        "enforcer.yaml": "include: [conf.d/*.yaml]\n" + MAIN,
        "conf.d/keys.yaml": "sessions: {refreshTokenKeyFile: keys/refresh}\n",
    })
    assert issues == [] and settings is not None
    assert settings.model.sessions.refreshTokenKeyFile == tmp_path / "keys" / "refresh"


def test_a_single_string_include_and_a_bad_include_value(tmp_path: Path) -> None:
    """include may be one string; a number there is refused at the key path include."""
    settings, issues = _read(tmp_path, {"enforcer.yaml": "include: d.yaml\n" + MAIN, "d.yaml": "tags: [d=1]\n"})
    assert issues == [] and settings is not None and settings.model.tags == ["d=1"]
    _, issues = _read(tmp_path, {"enforcer.yaml": "include: 5\n" + MAIN})
    assert [i.path for i in issues] == ["include"]


def test_a_glob_matching_too_many_files_is_refused(tmp_path: Path) -> None:
    """More drop-ins than MAX_INCLUDES (a glob over a whole folder by mistake) is one issue, not a slow start."""
    files = {f"d{n:03}.yaml": "" for n in range(settings_mod.MAX_INCLUDES + 1)}
    _, issues = _read(tmp_path, {"enforcer.yaml": "include: ['d*.yaml']\n" + MAIN, **files})
    assert [i.path for i in issues] == ["include"]


_keys = st.sampled_from(["a", "b", "c", "d"])
_trees: st.SearchStrategy[Any] = st.recursive(
    st.integers() | st.lists(st.integers(), max_size=2),
    lambda children: st.dictionaries(_keys, children, max_size=3),
    max_leaves=12,
)


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every non-mapping value (and every empty mapping) of ``tree`` by its key path."""
    if isinstance(tree, dict) and tree:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, (*prefix, k)))
        return out
    return {prefix: tree}


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@given(st.dictionaries(_keys, _trees, max_size=4), st.dictionaries(_keys, _trees, max_size=4))
def test_merge_keeps_every_value_of_the_drop_in_and_what_it_does_not_touch(
    base: dict[str, Any], extra: dict[str, Any]
) -> None:
    """After a merge every value of the drop-in is there; every value is the drop-in's where provenance names it and the base's elsewhere."""
    provenance: dict[str, str] = {}
    merged = settings_mod._merge(base, extra, "drop-in", "", provenance)
    for path, value in _leaves(extra).items():
        if path and value != {}:
            assert _at(merged, path) == value
    assert set(provenance.values()) <= {"drop-in"}
    for path, value in _leaves(merged).items():
        from_drop_in = any(path[:n] and ".".join(path[:n]) in provenance for n in range(1, len(path) + 1))
        assert value == _at(extra if from_drop_in else base, path)
