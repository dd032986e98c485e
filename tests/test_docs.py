"""The documentation's own checks: the vendored interfaces file, sentence length, links.

Plain text processing, no project imports, so it runs in well under a second.

- ``docs/interfaces.md`` is the shared interface file word for word, optionally followed by this
  repository's additions under :data:`ADDITIONS_MARKER`.
- README.md's first 120 lines have no sentence over 60 words; docs/architecture.md none over 40.
  Fenced code is left out; each list item, table cell and heading counts as its own text.
- Every relative Markdown link in README.md and docs/*.md names a file (and heading) that exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_INTERFACES = REPO.parent / "shared" / "docs" / "interfaces.md"
ADDITIONS_MARKER = "## Additions in this repository"
README_LINES, README_MAX_WORDS = 120, 60
ARCHITECTURE_MAX_WORDS = 40

FENCE = re.compile(r"^\s*(```|~~~)")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
# a sentence ends at . ! ? followed by a space or the end, not after these abbreviations
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)[.!?]+(?=\s|$)")
WORD = re.compile(r"\w")


# -- text units and sentences ------------------------------------------------------------------

def text_units(lines: list[str]) -> list[str]:
    """Markdown lines -> the texts whose sentences are counted: paragraphs, list items (with
    their continuation lines), table cells and headings. Fenced code is dropped."""
    units: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            units.append(" ".join(current))
            current.clear()

    in_fence = False
    for line in lines:
        if FENCE.match(line):
            flush()
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        stripped = line.strip()
        if not stripped:
            flush()
        elif stripped.startswith("|"):
            flush()
            if not TABLE_RULE.match(stripped):
                units.extend(cell for cell in table_cells(stripped) if cell.strip())
        elif stripped.startswith("#"):
            flush()
            units.append(stripped.lstrip("#"))
        elif LIST_ITEM.match(line):
            flush()
            current.append(LIST_ITEM.sub("", line, count=1))
        elif line.startswith("    ") and not current:
            continue  # an indented code block
        else:
            current.append(stripped)
    flush()
    return units


def table_cells(row: str) -> list[str]:
    """Split a table row on its unescaped pipes (``\\|`` stays inside a cell, code spans too)."""
    cells, cell, in_code = [], [], False
    i = 0
    while i < len(row):
        char = row[i]
        if char == "\\" and i + 1 < len(row) and row[i + 1] == "|":
            cell.append("|")
            i += 2
            continue
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append("".join(cell))
            cell = []
        else:
            cell.append(char)
        i += 1
    cells.append("".join(cell))
    return cells


def sentences(unit: str) -> list[str]:
    """One text -> its sentences. Links keep their text; a code span is one run of words whose
    dots do not end a sentence."""
    text = LINK.sub(lambda m: m.group(2), unit)
    text = CODE_SPAN.sub(lambda m: m.group(0).replace(".", "_").replace("!", "_")
                         .replace("?", "_"), text)
    return [s for s in SENTENCE_END.split(text) if s.strip()]


def word_count(sentence: str) -> int:
    return sum(1 for token in sentence.split() if WORD.search(token))


def long_sentences(lines: list[str], limit: int) -> list[tuple[int, str]]:
    return [(word_count(s), s.strip()) for unit in text_units(lines) for s in sentences(unit)
            if word_count(s) > limit]


# -- the checks ----------------------------------------------------------------------------------

def test_sentence_counter_counts_units_apart():
    lines = ["# A title", "", "One two three. Four five", "six seven.", "", "- item one",
             "  continued here", "- item two", "", "| cell one | `a.b c` d |", "| --- | --- |",
             "", "```", "code " * 100, "```", "See [the docs](docs/x.md), e.g. this one."]
    units = text_units(lines)
    assert units == [" A title", "One two three. Four five six seven.",
                     "item one continued here", "item two", " cell one ", " `a.b c` d ",
                     "See [the docs](docs/x.md), e.g. this one."]
    assert [word_count(s) for u in units for s in sentences(u)] == [2, 3, 4, 4, 2, 2, 3, 6]
    assert long_sentences(["word " * 61 + "."], 60) and not long_sentences(["word " * 60], 60)


def test_interfaces_md_is_the_shared_file_plus_additions():
    assert SHARED_INTERFACES.is_file(), f"{SHARED_INTERFACES} is not here (CI has ../shared)"
    ours = (REPO / "docs" / "interfaces.md").read_text(encoding="utf-8")
    shared = SHARED_INTERFACES.read_text(encoding="utf-8")
    head, marker, _ = ours.partition(f"\n{ADDITIONS_MARKER}\n")
    if not marker:
        head = ours
    assert head.rstrip("\n") == shared.rstrip("\n"), (
        f"docs/interfaces.md differs from {SHARED_INTERFACES} before '{ADDITIONS_MARKER}': copy "
        f"the shared file again and keep this repository's additions under that heading")
    assert ours.count(ADDITIONS_MARKER) <= 1


def test_readme_opening_sentences_are_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()[:README_LINES]
    too_long = long_sentences(lines, README_MAX_WORDS)
    assert not too_long, f"README.md, first {README_LINES} lines: sentences over " \
                         f"{README_MAX_WORDS} words: {too_long}"


def test_architecture_sentences_are_short():
    lines = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines()
    too_long = long_sentences(lines, ARCHITECTURE_MAX_WORDS)
    assert not too_long, f"docs/architecture.md: sentences over {ARCHITECTURE_MAX_WORDS} " \
                         f"words: {too_long}"


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```")[1]
    assert "search/run.py --num-samples 200" in first_block
    assert ".venv/bin/python -m pytest -q" in first_block
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_command.strip() in first_block, "the README's test command is what .ci/run runs"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = LINK.sub(lambda m: m.group(2), heading.strip().lstrip("#").strip())
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^#{1,6}\s", line):
            base = slug(line)
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^\s*```.*?^\s*```", "", text)  # no links inside fenced code
    text = CODE_SPAN.sub("", text)
    targets = [m.group(3) for m in LINK.finditer(text)] + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(doc: Path):
    broken = []
    for target in relative_links(doc):
        file_part, _, fragment = target.partition("#")
        destination = (doc.parent / file_part).resolve() if file_part else doc
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"
