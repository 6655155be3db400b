"""`raykd inspect`: a cache's manifest, sizes, bytes per row of every column, and its targets' accuracy."""

from __future__ import annotations

import numpy as np
import torch

from raykd.pipeline.cache.codecs import topk_decode
from raykd.pipeline.cache.reader import Cache, column_array


def source_probs(cache: Cache, table, source: str) -> torch.Tensor:
    """A target source's probabilities (at tau 1 for logits, at the top-k's tau for top-k) on the rows of
    `table`: enough for its accuracy and for the teachers' mean."""
    cols = cache.target_columns(source)
    if len(cols) == 1:
        return torch.from_numpy(column_array(table, cols[0]).astype(np.float32)).softmax(1)
    tk = cache.targets["topk"]
    z = topk_decode(column_array(table, cols[0]), column_array(table, cols[1]), cache.num_classes, tk["temperature"])
    return (z / tk["temperature"]).softmax(1)


def inspect_cache(uri: str, s3_endpoint: str | None = None, verify: bool = False) -> str:
    """The summary `raykd inspect` prints; `verify` also checks every file's sha256."""
    cache = Cache(uri, s3_endpoint)
    if verify:
        cache.verify()
    m = cache.manifest
    per_col = cache.column_bytes()
    table = cache.read_table(["label", *[c for s in cache.sources for c in cache.target_columns(s)]])
    labels = column_array(table, "label")
    t = m["targets"]
    held = ["full fp16 logits"] if t["logits"] else []
    if t["topk"]:
        held.append(f"top-{t['topk']['k']} probabilities at tau {t['topk']['temperature']:g} of "
                    f"{'each teacher' if t['topk']['of'] == 'teachers' else 'the teachers mean'}")
    lines = [
        f"cache      {uri}",
        f"dataset    {m['dataset']['name']} ({m['dataset']['train_samples']} train samples, "
        f"{m['dataset']['num_classes']} classes, image {'x'.join(map(str, m['dataset']['image_shape']))})",
        f"views      K={m['views']}  policy {m['policy']}  store_views={m['store_views']}",
        f"targets    {', '.join(held)}",
        f"rows       {m['rows']}  in {len(m['files'])} files, {m['bytes'] / 2**20:.2f} MiB "
        f"({m['bytes'] / max(1, m['rows']):.0f} B per row, {m['bytes'] / max(1, m['dataset']['train_samples']):.0f} B per sample over K views)",
        f"built      {m['created']} in {m['build_seconds']:.1f}s, fingerprint {m['fingerprint'][:16]}"
        + ("  (verified: every file matches its sha256)" if verify else ""),
        "",
        f"{'column':<28} {'type':<32} {'B/row':>8}",
    ]
    for name, typ in m["columns"].items():
        lines.append(f"{name:<28} {typ:<32} {per_col.get(name, 0) / max(1, m['rows']):>8.1f}")
    lines += ["", f"{'teacher':<14} {'arch':<11} {'val acc':>8} {'cached-view acc':>16}"]
    arch = {x["name"]: (x["arch"], x["val_acc"]) for x in m["teachers"]}
    probs = []
    for source in cache.sources:
        p = source_probs(cache, table, source)
        probs.append(p)
        acc = (p.argmax(1).numpy() == labels).mean()
        a, v = arch.get(source, ("mean", None))
        lines.append(f"{source:<14} {a:<11} {'' if v is None else f'{100 * v:.2f}%':>8} {100 * acc:>15.2f}%")
    if len(probs) > 1:
        ens = (torch.stack(probs).mean(0).argmax(1).numpy() == labels).mean()
        lines.append(f"{'ensemble':<14} {'mean prob':<11} {'':>8} {100 * ens:>15.2f}%")
    if m.get("professor"):
        p = m["professor"]
        lines.append(f"{'professor':<14} {'CAAE':<11} {'':>8} {100 * p['refined_acc']:>15.2f}%  "
                     f"(refined column, checkpoint {p['checkpoint_sha256'][:12]})")
    return "\n".join(lines)
