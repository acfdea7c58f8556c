"""The README and the pages under docs/ stay readable and whole: every relative link (and its #anchor) leads to a file
and heading that exist, no line is wider than 120 characters, and the README keeps its two commands first and a link
to every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WIDTH = 120
# the pages the README's table of contents promises (issue 24); another branch's page joins them when it lands
OWN_PAGES = ["studies", "reports", "ui", "search", "allocation", "runtimes", "papers", "methods", "recovery", "performance", "metrics",
             "extending", "tests"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text a reader sees as Markdown: fenced blocks and inline code removed (a `[x](y)` there is no link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as '-', repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_anchor_rule_is_githubs():
    text = ("# A\n## Sparse execution (`quantization=sparse`)\n## What `make run` prints\n## A\n"
            "```\n# not a heading\n```\n")
    assert anchors(text) == {"a", "a-1", "sparse-execution-quantizationsparse", "what-make-run-prints"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            broken.append(f"{target}: {dest.name} has no heading #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_line_is_wider_than_120_characters(page):
    """Prose and tables; a fenced block is a program's output as it prints it, and stays verbatim."""
    fenced, wide = False, []
    for n, line in enumerate(page.read_text().split("\n"), 1):
        fenced ^= line.lstrip().startswith("```")
        if len(line) > WIDTH and not fenced:
            wide.append(f"line {n}: {len(line)}")
    assert not wide, f"{page.relative_to(REPO)} has lines over {WIDTH} characters: " + ", ".join(wide)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md) `[code](not-a-link.md)` [web](https://example.org)\n"
                    "```\n[fenced](nor-this.md)\n```\n")
    assert relative_links(page) == ["page.md", "missing.md"]


def test_the_readme_starts_with_its_two_commands_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"^```bash\n(.*?)^```", readme, re.M | re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "run"], ["make", "test"]]
    linked = {Path(t.partition("#")[0]).stem for t in relative_links(REPO / "README.md") if t.startswith("docs/")}
    missing = [name for name in OWN_PAGES if name not in linked or not (REPO / "docs" / f"{name}.md").exists()]
    assert not missing, f"README.md does not link docs/{{{', '.join(missing)}}}.md"
    assert len(readme.splitlines()) <= 300, "the README is a five-minute read: the details go to docs/"
