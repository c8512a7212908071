"""Every relative link in the repository's Markdown files points at a file or folder that exists.

Checked: inline links and images (``[text](path)``, ``![alt](path)``) and reference definitions
(``[name]: path``), outside code blocks and code spans. Skipped: links with a scheme (``https:``,
``mailto:``) and links to an anchor of the same page (``#section``); a ``#fragment`` after a path
is dropped and the path checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _markdown_files(root: Path) -> list[Path]:
    """The ``.md`` files git tracks or would add (ignored ones, virtual environments, left out);
    without git, every ``.md`` file outside hidden folders and installed packages."""
    git = shutil.which("git")
    if git is not None and (root / ".git").exists():
        listed = subprocess.run(
            [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.md"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return sorted({root / name for name in listed.split("\0") if name and (root / name).is_file()})
    return sorted(
        path
        for path in root.rglob("*.md")
        if not any(part.startswith(".") or part == "site-packages" for part in path.relative_to(root).parts)
    )


def _link_targets(text: str) -> list[str]:
    """The link targets of a Markdown text, outside code blocks and code spans."""
    text = _FENCE.sub("", text)
    text = _CODE_SPAN.sub("code", text)
    return [match.group(1) for pattern in (_INLINE, _REFERENCE) for match in pattern.finditer(text)]


def broken_links(root: Path, files: list[Path]) -> list[str]:
    """``"file: target"`` for every relative link of ``files`` whose target does not exist.

    Arguments:
        root: the repository root (a link starting with ``/`` is relative to it).
        files: the Markdown files to check.

    Returns:
        The broken links, in file order.
    """
    broken = []
    for path in files:
        for target in _link_targets(path.read_text(encoding="utf-8")):
            if not target or target.startswith("#") or _SCHEME.match(target):
                continue
            relative = urllib.parse.unquote(target.split("#", 1)[0].split("?", 1)[0])
            resolved = root / relative.lstrip("/") if relative.startswith("/") else path.parent / relative
            if not resolved.exists():
                broken.append(f"{path.relative_to(root)}: {target}")
    return broken


def test_every_relative_markdown_link_resolves() -> None:
    files = _markdown_files(_ROOT)
    assert _ROOT / "README.md" in files
    assert broken_links(_ROOT, files) == []


def test_the_check_finds_broken_links_and_skips_the_rest(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# real\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/real.md) [ok](docs/real.md#real) ![ok](docs/) [ok](/docs/real.md) [ok](<docs/real.md>)\n"
        "[web](https://example.com/missing) [mail](mailto:x@example.com) [anchor](#real)\n"
        "`[code](missing-in-code.md)` and\n```\n[block](missing-in-block.md)\n```\n"
        "[gone](docs/gone.md) ![gone](img/gone.png) [`gone`](gone.py)\n"
        "[ref]: docs/also-gone.md\n"
    )
    assert broken_links(tmp_path, [page]) == [
        "README.md: docs/gone.md",
        "README.md: img/gone.png",
        "README.md: gone.py",
        "README.md: docs/also-gone.md",
    ]
