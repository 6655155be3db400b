"""The cache's one naming scheme: every column name is made and parsed here.

    sample_id, view_id, label                   the row: which image, which view
    view_<field>, pixels                        the view's record (pad_crop: view_ox, view_oy, view_flip;
                                                 random_resized_crop: view_x, view_y, view_w, view_h,
                                                 view_flip) and (unless store_views: false) its pixels
    logits.<teacher>                            fp16 logits (cache.logits)
    topk.<source>.probs / topk.<source>.indices top-k probabilities at tau and their classes (cache.topk);
                                                 <source> is a teacher, or `ensemble` (the teachers' mean)
    feat.<teacher>.<stage> [+ .scale]           a feature map, fp16 or int8 with a per-row fp32 scale
    refined                                     the professor's refined logits (its own rows, refined/)
"""

from __future__ import annotations

from dataclasses import dataclass

ENSEMBLE = "ensemble"  # the top-k source of the teachers' mean probabilities (a name no teacher may take)
ROW = ("sample_id", "view_id", "label")


def record(field: str) -> str:
    """The column of a view record's field (ViewPolicy.record)."""
    return f"view_{field}"
PIXELS = "pixels"
REFINED = "refined"


def logits(teacher: str) -> str:
    return f"logits.{teacher}"


def topk(source: str) -> tuple[str, str]:
    """(probabilities, indices) of a top-k source."""
    return f"topk.{source}.probs", f"topk.{source}.indices"


def feat(teacher: str, stage: str) -> str:
    return f"feat.{teacher}.{stage}"


def scale(column: str) -> str:
    """The per-row scale beside an int8 feature map."""
    return f"{column}.scale"


@dataclass(frozen=True)
class Column:
    kind: str  # logits, topk, feat, or the name itself for the plain columns
    source: str | None = None  # the teacher (or `ensemble`)
    stage: str | None = None  # feat: the stage
    part: str | None = None  # topk: probs / indices; feat: scale


def parse(name: str) -> Column:
    parts = name.split(".")
    if parts[0] == "logits" and len(parts) == 2:
        return Column("logits", parts[1])
    if parts[0] == "topk" and len(parts) == 3:
        return Column("topk", parts[1], part=parts[2])
    if parts[0] == "feat" and len(parts) >= 3:  # a stage may be a dotted module path (features.8)
        scaled = parts[-1] == "scale" and len(parts) >= 4
        return Column("feat", parts[1], ".".join(parts[2:-1] if scaled else parts[2:]), "scale" if scaled else None)
    return Column(name)


def teacher_of(name: str) -> str | None:
    """The teacher (or top-k source) a column belongs to, else None."""
    return parse(name).source
