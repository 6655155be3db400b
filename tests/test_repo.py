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
