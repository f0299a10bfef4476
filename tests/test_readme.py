"""The README's layout names every module of the gateway, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layout_lists_every_gateway_module() -> None:
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("### Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    listed = set(re.findall(r"^  ([a-z_]+\.py) ", layout, re.MULTILINE))
    modules = {p.name for p in (ROOT / "gateway").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert modules - listed == set(), "modules the README's layout does not list"
    assert listed - modules == set(), "modules the README's layout lists that do not exist"
