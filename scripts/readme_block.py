"""Rewrite the part of README.md between two HTML-comment markers (sections generated from measurements)."""
from __future__ import annotations

from pathlib import Path


def rewrite(readme: Path, name: str, section: str) -> None:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` with ``section``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{section}\n{end}{tail}")
