"""docs/cache.md's recipes for reading a cache without raykd (pyarrow, pandas, DuckDB, Polars) and with its
Python API, taken out of docs/cache.md as they are and run on the shared digits cache."""

import os
import re

import numpy as np
import pytest

from raykd.pipeline.cache import Cache, column_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipes() -> dict[str, str]:
    """`# read with X` code blocks of docs/cache.md, by X."""
    text = open(os.path.join(ROOT, "docs", "cache.md")).read()
    blocks = re.findall(r"```python\n(# read with ([^\n(]+?)\s*(?:\(.*?\))?\n.*?)```", text, flags=re.S)
    return {name.strip(): code for code, name in blocks}


def test_the_readme_has_the_five_recipes():
    assert sorted(recipes()) == ["DuckDB", "Polars", "pandas", "pyarrow", "raykd's Python API"]


@pytest.mark.parametrize("reader", ["pyarrow", "pandas", "DuckDB", "Polars", "raykd's Python API"])
def test_readme_recipe_reads_every_row_once_with_its_tensors(built, digits, reader):
    cfg, m = built
    uri = os.path.join(cfg.run.out_dir, "cache")
    ns = {"uri": uri}
    exec(recipes()[reader], ns)
    out = ns.get("table", ns.get("df")) if reader != "raykd's Python API" else ns["df"]
    get = (lambda c: np.asarray(out[c])) if not hasattr(out, "column_names") else (lambda c: column_array(out, c))
    ids, views = get("sample_id").astype(np.int64), get("view_id").astype(np.int64)
    n, k = len(digits.train), m["views"]
    expect_rows = n if reader == "raykd's Python API" else n * k
    assert len(ids) == len(set(zip(ids.tolist(), views.tolist()))) == expect_rows  # each (sample, view) once
    if reader != "raykd's Python API":
        assert sorted(set(get("view").astype(int).tolist())) == list(range(k))  # the Hive partition column
    pixels = ns["pixels"]
    assert pixels.shape == (expect_rows, *digits.train.images.shape[1:])
    # the same pixels as raykd reads, row by row
    ref = Cache(uri).read_table(["sample_id", "view_id", "pixels"], views=None if expect_rows == n * k else [0])
    key = np.lexsort((column_array(ref, "sample_id"), column_array(ref, "view_id")))
    mine = np.lexsort((ids, views))
    np.testing.assert_array_equal(pixels[mine], column_array(ref, "pixels")[key])
