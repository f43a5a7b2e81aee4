"""The recipe's hub: section: validated like every other section (errors name the key)."""

from __future__ import annotations

import pytest

from neuromerge_cli.errors import MergeError
from neuromerge_cli.recipe import HubTarget, parse_recipe

BASE = {"base_model": "org/base", "models": ["org/a", "org/b"], "method": "task_arithmetic"}


def test_hub_section_parses() -> None:
    r = parse_recipe({**BASE, "hub": {"repo_id": " user/merged ", "private": True, "revision": "exp",
                                      "commit_message": "merge v2"}})
    assert r.hub == HubTarget("user/merged", True, "exp", "merge v2")
    assert parse_recipe({**BASE, "hub": {"repo_id": "merged"}}).hub == HubTarget("merged")
    assert parse_recipe(BASE).hub is None


@pytest.mark.parametrize("hub, message", [
    ({"repo_id": "u/m", "branch": "x"}, "hub.branch: unknown key (allowed: repo_id, private, revision, commit_message)"),
    ({"private": True}, "hub.repo_id: expected a Hub repository id"),
    ({"repo_id": "a/b/c"}, "hub.repo_id: expected a Hub repository id"),
    ({"repo_id": 42}, "hub.repo_id: expected a Hub repository id"),
    ({"repo_id": "u/m", "private": "yes"}, "hub.private: expected true or false"),
    ({"repo_id": "u/m", "revision": ""}, "hub.revision: expected a non-empty string"),
    ({"repo_id": "u/m", "commit_message": 3}, "hub.commit_message: expected a non-empty string"),
    ("user/merged", "hub: expected a mapping with repo_id"),
])
def test_hub_section_errors(hub: object, message: str) -> None:
    with pytest.raises(MergeError) as info:
        parse_recipe({**BASE, "hub": hub})
    assert str(info.value).startswith(message)
