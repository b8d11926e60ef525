"""MkDocs hook: the Benchmarks page is BENCHMARKS.md from the repository root, its links made to work in the site.

Links to files in docs/ (figures, JSON results) become relative to the page; links to folders and to other
files of the repository (scripts, README sections), which the site does not hold, become their path in code.
Anchors stay as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- BENCHMARKS.md -->"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _fix(match: re.Match[str]) -> str:
    bang, text, target = match.groups()
    if target.startswith(("#", "http://", "https://")):
        return match.group(0)
    if target.startswith("docs/") and not target.endswith("/"):
        return f"{bang}[{text}]({target.removeprefix('docs/')})"
    return f"{text} (`{target}`)"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    source = Path(config["config_file_path"]).parent / "BENCHMARKS.md"
    return markdown.replace(MARKER, LINK.sub(_fix, source.read_text(encoding="utf-8")))
