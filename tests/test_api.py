"""The Python API (raykd/__init__.py) and its example script."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_script_runs_and_returns_records(tmp_path, capsys, monkeypatch):
    import logging

    monkeypatch.setattr(sys, "argv", ["api.py", f"run.out_dir={tmp_path}"])
    runpy.run_path(os.path.join(ROOT, "examples", "api.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("teacher ") and "KD student" in out and "logits (1, 10)" in out
    assert "[distill" not in out  # the raykd logger was quieted: no progress lines
    logging.getLogger("raykd").setLevel(logging.INFO)
    import raykd

    cfg = raykd.load_config(None, [f"run.out_dir={tmp_path}", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
                                   "cache.layers={}"])
    with pytest.raises(raykd.RaykdError, match="no finished student 'nobody'"):
        raykd.load_student(cfg, "nobody")
    with pytest.raises(raykd.RaykdError, match="method.name"):
        raykd.with_changes(cfg, {"method.name": "nope"})
