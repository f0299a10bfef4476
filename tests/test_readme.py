"""The README and the docs pages: the README stays a front page, its links lead to pages
and headings that exist, every page of docs/ is in the site's nav, and the layout in
docs/development.md names every module of the gateway, and no module that is gone."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move the detail to docs/"


def _slug(heading: str) -> str:
    """The id MkDocs gives a heading (the slugify of Markdown's toc extension)."""
    text = unicodedata.normalize("NFKD", heading.replace("`", ""))
    text = re.sub(r"[^\w\s-]", "", text.encode("ascii", "ignore").decode()).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    """The ids of a page's headings, those in code blocks left out."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return {_slug(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_the_readme_links_lead_somewhere() -> None:
    readme = ROOT / "README.md"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", readme.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else readme
        headings = _anchors(file) if file.suffix == ".md" and file.exists() else set()
        if not file.exists() or (anchor and headings and anchor not in headings):
            broken.append(target)
    assert broken == [], "links of the README to no file, or to no heading of it"


class _MkDocsLoader(yaml.SafeLoader):  # type: ignore[misc]
    """Reads mkdocs.yml, whose !relative and !!python/name tags are for MkDocs alone."""


_MkDocsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
_MkDocsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _nav_pages(nav: Any) -> set[str]:
    """The pages a nav, or a section of one, lists."""
    if isinstance(nav, str):
        return set() if "://" in nav else {nav}
    pages: set[str] = set()
    for item in nav.values() if isinstance(nav, dict) else nav:
        pages |= _nav_pages(item)
    return pages


def test_every_docs_page_is_in_the_nav() -> None:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = _nav_pages(yaml.load(text, Loader=_MkDocsLoader)["nav"])  # noqa: S506 (a SafeLoader)
    pages = {page.relative_to(DOCS).as_posix() for page in DOCS.rglob("*.md")}
    # Pages `make bench` writes may come before the nav lists them (not_in_nav).
    written = {page for page in pages if page.startswith("bench/")}
    assert pages - written - nav == set(), "pages of docs/ that mkdocs.yml's nav does not list"
    assert nav - pages == set(), "pages mkdocs.yml's nav lists that are not in docs/"


def test_the_layout_lists_every_gateway_module() -> None:
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    layout = text[text.index("\n## Layout\n") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    listed = set(re.findall(r"^  ((?:[a-z_]+/)?[a-z_]+\.py) ", layout, re.MULTILINE))
    gateway = ROOT / "gateway"
    modules = {
        p.relative_to(gateway).as_posix()
        for p in gateway.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert modules - listed == set(), "modules the layout in docs/development.md does not list"
    assert listed - modules == set(), "modules the layout lists that do not exist"
