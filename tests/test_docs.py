"""The README and docs/ as a newcomer meets them: every path exists in a clone, every
command names a script that exists and passes that script's own argument parser, and the
job-file reference is the one the spec generates."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from iddpm_ds.spec.markdown import job_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# created by the README's own commands (the demo writes data/ and runs/), or by the user
GENERATED = ("data/", "runs/", "hosts", "job.yaml", "job.schema.json")
TRACKED_ROOTS = ("launch/", "docs/", "ds_configs/", "bench/", "tests/", "iddpm_ds/", ".ci/")
CONSOLE = {"iddpm-train": "train", "iddpm-shards": "make_shards", "iddpm-sample": "sample",
           "iddpm-evaluate": "evaluate"}


def _code_blocks(text: str) -> list[str]:
    """Shell blocks (```bash or ```sh); fences are paired in order."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if lang in ("bash", "sh")]


def _commands(text: str) -> list[str]:
    """Shell lines of the fenced blocks, continuation lines joined, comments dropped."""
    out = []
    for block in _code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(line)
    return out


def test_job_reference_is_generated_from_the_spec():
    committed = (ROOT / "docs" / "job_file.md").read_text()
    assert committed == job_reference_markdown(), (
        "docs/job_file.md is stale: python launch/train.py --schema docs/job_file.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_point_at_files_in_the_clone(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if not re.match(r"[a-z]+://", link)
               and not (doc.parent / link).exists()]
    assert not missing, f"{doc.name} links to files a clone does not have: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_in_commands_exist(doc):
    missing = []
    for line in _commands(doc.read_text()):
        for word in shlex.split(line):
            word = word.split("=", 1)[-1].split("#", 1)[0]
            if word.startswith(TRACKED_ROOTS) and not word.startswith(GENERATED):
                if "*" not in word and "{" not in word and not (ROOT / word).exists():
                    missing.append(word)
    assert not missing, f"{doc.name} names paths a clone does not have: {missing}"


def _launch_module(name: str):
    # launch/ is installed as the package iddpm_ds_launch (the console scripts' home)
    return importlib.import_module(f"iddpm_ds_launch.{name}")


def _script_and_args(words: list[str]) -> tuple[str, list[str]] | None:
    """The launch script a command runs and the arguments it passes to it."""
    for i, word in enumerate(words):
        if word in CONSOLE:
            return CONSOLE[word], words[i + 1:]
        match = re.fullmatch(r"launch/(\w+)\.py", word)
        if match:
            return match.group(1), words[i + 1:]
    return None


def test_readme_commands_pass_their_parsers():
    """Every python command of the README is accepted by its script's own parser."""
    checked = 0
    for line in _commands((ROOT / "README.md").read_text()):
        found = _script_and_args(shlex.split(line))
        if found is None:
            continue
        name, args = found
        module = _launch_module(name)
        parse = getattr(module, "parse_args", None)
        try:
            if parse is not None:
                parse(args)
            else:
                module.build_parser().parse_args(args)
        except SystemExit as err:
            pytest.fail(f"README command rejected by launch/{name}.py (exit {err.code}): {line}")
        checked += 1
    assert checked >= 5, "the README should show the train, shards, sample and evaluate commands"


def test_readme_first_lines_give_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    block = "\n".join(head)
    assert "bash launch/demo.sh" in block and "bash .ci/test.sh" in block
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/test.sh" in ci, ".ci/run must call the README's test command"
