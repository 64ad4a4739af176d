"""The documentation stays true: its generated pages match the code and the results files, and every `cdm …`
command it shows still parses.

A command that would do work runs as a check that ends before any: `cdm run … --dry-run` (in a temporary
work folder), `cdm train CONFIG … --print-config`, anything else `--help` right after the command's name,
which still refuses an option the command does not have. Each goes through `cdm_forks` (the real `cdm`,
forked: ~0.3 s a command), and none starts Ray, so this module runs in PARALLEL_LANE.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# the words of `cdm` that are command groups: their subcommand is part of the command's name
GROUPS = {"jobs"}


def test_the_generated_pages_are_current():
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, f"stale documentation; run `make docs`:\n{out.stdout}{out.stderr}"


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for every line of a code block that runs `cdm`, its comment taken off."""
    found = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            lines = block.replace("\\\n", " ").splitlines()
            for line in lines:
                text = line.strip().removeprefix("$ ")
                if not text.startswith("cdm "):
                    continue
                words = shlex.split(text, comments=True)
                found.append((page.relative_to(ROOT).as_posix(), shlex.join(words)))
    return found


def as_check(words: list[str], workdir: Path) -> list[str]:
    """The argv (after `cdm`) that checks the command without doing its work."""
    head = 0
    while head < len(words) and words[head].startswith("-") and words[head] not in ("--help", "--version"):
        head += 1  # global options (--debug, --verbose)
    if head == len(words) or words[head] in ("--help", "--version", "version"):
        return words
    name_end = head + (2 if words[head] in GROUPS and head + 1 < len(words) else 1)
    command, rest = words[head], words[name_end:]
    if command == "run" and "--dry-run" not in rest and "--list-settings" not in rest:
        return [*words[:name_end], *rest, "--dry-run", "--workdir", str(workdir)]
    if command == "train" and rest and not rest[0].startswith("-") and "--help" not in rest:
        return [*words[:name_end], *rest, "--print-config"]
    return [*words[:name_end], "--help", *rest]


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    pages = {page for page, _ in COMMANDS}
    assert len(COMMANDS) >= 50 and {"README.md", "docs/stages/train.md", "docs/reference/cli.md"} <= pages


def placeholder_home(argv: list[str], home: Path) -> dict[str, str]:
    """The environment with HOME at `home`, holding an empty file for each `~/…` input the command names (the
    reader's own files, such as `~/cifar-10-python.tar.gz`: a dry run checks that its inputs exist)."""
    for word in argv:
        for name in re.findall(r"~/([^\s,=]+)", word):
            path = home / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch() if path.suffix else path.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home)}


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_every_shown_command_parses(page, command, cdm_forks, tmp_path):
    argv = as_check(shlex.split(command)[1:], tmp_path / "work")
    env = placeholder_home(argv, tmp_path / "home")
    result = cdm_forks.run(argv, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, (
        f"{page}: `{command}` no longer parses (ran `cdm {shlex.join(argv)}`):\n{result.stdout}{result.stderr}"
    )


def test_the_readme_links_to_files_that_exist():
    """mkdocs checks the site's links (`make docs` is strict); the README, outside the site, is checked here."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links into docs/"
    assert [link for link in local if not (ROOT / link).exists()] == []


@pytest.mark.parametrize("command", ["train", "run"])
def test_every_listed_setting_is_in_the_reference(command, cdm_forks):
    listed = cdm_forks.run([command, "--list-settings"], cwd=ROOT, timeout=60)
    assert listed.returncode == 0, listed.stderr
    keys = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    section = page.split(f"\n## {command}\n", 1)[1].split("\n## ", 1)[0]
    assert len(keys) > 50 and [k for k in keys if f"| `{k}` |" not in section] == []
