"""The repository stands alone: no text points at a document that is not in it."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_reference_to_a_document_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.toml", "Makefile"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(files) > 20
    bad = []
    for f in files:
        text = open(os.path.join(ROOT, f), encoding="utf-8").read()
        if "../" + "shared/" in text:  # the team folder beside the project (split: this line is scanned too)
            bad.append(f"{f}: the team folder outside the repository")
        for ref in re.findall(r"(?<![\w/.])(docs/[\w./-]+\.md)", text):
            if not os.path.isfile(os.path.join(ROOT, ref)):
                bad.append(f"{f}: {ref}")
    assert not bad, "references to documents not in the repository:\n" + "\n".join(bad)


def test_docs_list_every_method_option():
    """docs/methods.md's option tables name every option of every registered method (and no other)."""
    import methods  # noqa: F401  (registers them)
    from methods.base import METHODS

    text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    for name, cls in METHODS.items():
        opts = getattr(cls, "Options", None)
        if opts is None:
            continue
        start = text.index(f"**`{name}`**")
        end = text.find("**`", start + 1)
        section = text[start:end if end > 0 else None]
        listed = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
        assert listed == list(opts.model_fields), f"docs/methods.md, {name}: {listed} vs {list(opts.model_fields)}"
