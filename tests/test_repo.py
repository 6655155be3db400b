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
    import raykd.methods  # noqa: F401  (registers them)
    from raykd.methods.base import METHODS

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


def test_the_wheel_installs_raykd_alone(tmp_path):
    """`pip install raykd` puts one top-level name into site-packages: `raykd` (its `pipeline` and `methods`
    inside it), never a `pipeline` or `methods` of its own that a user's modules would collide with."""
    import shutil
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "raykd", "pipeline", "methods"):
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif os.path.exists(path):
            shutil.copy(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("raykd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"raykd", wheel.name.split("-py")[0] + ".dist-info"}
    packaged = {f"raykd/{os.path.relpath(os.path.join(d, f), ROOT)}" for top in ("pipeline", "methods")
                for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs if f.endswith((".py", ".yaml"))}
    assert {"raykd/__init__.py", "raykd/__main__.py", "raykd/pipeline/harness/ray_data_logging.yaml"} <= set(names)
    assert packaged - set(names) == set()  # every module of every layer, and the data files
    entry = zipfile.ZipFile(wheel).read(wheel.name.split("-py")[0] + ".dist-info/entry_points.txt").decode()
    assert "raykd = raykd.pipeline.cli:main" in entry
