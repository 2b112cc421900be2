"""Every `make X` the README and the docs (docs/*.md) tell a reader to run exists in the Makefile: a documented
entry point that make answers with "No rule to make target" is the first thing a new user meets."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: `make demo`, `make bench-fleet`; not `make sure` in prose (checked against a list of words below).
MAKE_RE = re.compile(r"\bmake ([a-z][a-z0-9-]*)\b")
#: English words that follow "make" in prose and are not targets.
PROSE = frozenset({"a", "an", "the", "it", "them", "this", "that", "sure", "every", "each", "one", "no", "up",
                   "room", "its", "their", "some", "all", "any", "both", "use", "way", "progress", "space",
                   "sense", "modelfs"})


def readme_targets(text: str) -> set[str]:
    """Target names a document names after `make` (in code blocks, inline code and prose alike)."""
    return {m.group(1) for m in MAKE_RE.finditer(text)} - PROSE


def documents() -> list[Path]:
    """The README and every page under docs/: each is read the same way."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def named_targets() -> dict[str, set[str]]:
    """Per document (its path in the repository), the make targets it names."""
    return {str(path.relative_to(REPO)): readme_targets(path.read_text()) for path in documents()}


def makefile_targets(text: str) -> set[str]:
    """Rule names of a Makefile (`name:` or `a b:` at the start of a line, not `VAR :=`), plus .PHONY names."""
    targets: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        m = re.match(r"^([^:=#]+?)\s*::?(?!=)", line)
        if m:
            targets.update(name for name in m.group(1).split() if not name.startswith("$"))
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
    return targets


def test_parsers_see_what_they_should() -> None:
    assert readme_targets("run `make soak` and then\n    make bench-fleet   # x\nto make sure") == {"soak",
                                                                                             "bench-fleet"}
    mk = "VENV ?= .venv\nPY := x\n.PHONY: a\n\nbench: venv\n\techo make: no\n$(VENV)/.installed: p\nb c: d\n"
    assert makefile_targets(mk) == {".PHONY", "a", "bench", "b", "c"}


def test_every_make_target_the_docs_name_exists() -> None:
    per_doc = named_targets()
    assert len(per_doc) > 1, per_doc  # README.md and at least one page under docs/
    named = set().union(*per_doc.values())
    assert {"test", "demo", "soak"} <= named, named  # the parse found the documented entry points
    defined = makefile_targets((REPO / "Makefile").read_text())
    missing = {doc: sorted(targets - defined) for doc, targets in per_doc.items() if targets - defined}
    assert not missing, f"documents name make targets the Makefile lacks: {missing}"


def test_every_documented_target_is_phony() -> None:
    """None of them makes a file of its name: without .PHONY a stray file called `soak` would skip it."""
    text = (REPO / "Makefile").read_text()
    phony = {n for line in text.splitlines() if line.startswith(".PHONY:") for n in line.split(":", 1)[1].split()}
    not_phony = {doc: sorted(targets - phony) for doc, targets in named_targets().items() if targets - phony}
    assert not not_phony, not_phony
