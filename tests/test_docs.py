"""The user-facing documents stand on their own in a clone (issue 14.7): every relative link or path
they give resolves to a file inside the repository; and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "t2i" / "assets").glob("*/*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
UP_PATH = re.compile(r"(?:\.\./)+[\w./-]*\w")  # any ../path written in the text, linked or not


def relative_targets(text: str) -> set[str]:
    links = {m.group(1).partition("#")[0] for m in LINK.finditer(text)}
    links = {t for t in links if t and not re.match(r"[a-z]+:", t)}  # not http:, mailto:, ...
    return links | set(UP_PATH.findall(text))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_paths_stay_inside_the_repository(doc):
    bad = []
    for target in sorted(relative_targets(doc.read_text(encoding="utf-8"))):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)} points outside the repository or at missing files: {bad}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index("Run the tests"):]
    command = re.search(r"```bash\n(.*?)\n```", after, re.S).group(1).strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1].strip() == command
