"""README.md and docs/: the two commands are there verbatim, every link and cited file exists inside the
repository, and nothing points outside it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITED = re.compile(r"`((?:ggro|jobs|pipeline|actors|tests|cluster|benchmarks|docs)/[\w./-]+\.(?:py|yaml|md|jsonl|png))")


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than - and _ dropped, spaces to dashes."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_readme_has_the_two_commands_and_stays_short():
    text = (ROOT / "README.md").read_text()
    assert "bash setup.sh && ggro align --local --output out/example --max-new-tokens 48" in text
    assert "bash setup.sh && python3 -m pytest -q" in text
    assert len(text.encode()) < 12_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_cited_files_exist(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(ROOT) and dest.exists(), f"{page.name}: broken link {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"
    for cited in CITED.findall(text):
        assert (ROOT / cited).exists(), f"{page.name} cites {cited}, which is not in the repository"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_nothing_points_outside_the_repository(page):
    found = re.findall(r"\.\./shared|/work/|issue #\d+", page.read_text(), re.I)
    assert not found, f"{page.name} refers to {found}"


def test_every_docs_page_is_listed_in_the_readme():
    text = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, page.name
