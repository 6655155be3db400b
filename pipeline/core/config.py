"""One typed config for every stage: defaults in code, a YAML overrides them, `key=value` overrides the YAML.

Unknown keys and wrong types are errors that name the key and where it came from (file or command line).
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from raykd.pipeline.core import yamlio
from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.core.schema import NAME_RE, OutputName, Section, Seed, check_endpoint  # noqa: F401  (Section: the base of every section, methods' too)
from raykd.pipeline.core.sections import CacheSection, DataSection, RaySection, RunSection, TeachersSection
from raykd.pipeline.core.train_sections import (
    DistillSection,
    MethodBase,
    ProfessorSection,
    SweepSection,
    _method_section,
)

MethodSection = _method_section()


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    ray: RaySection = Field(default_factory=RaySection)
    data: DataSection = Field(default_factory=DataSection)
    teachers: TeachersSection = Field(default_factory=TeachersSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    professor: ProfessorSection = Field(default_factory=ProfessorSection)
    method: MethodSection = Field(default_factory=MethodSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    sweep: SweepSection = Field(default_factory=SweepSection)

    @model_validator(mode="after")
    def _cache_names_known(self) -> "Config":
        known = {t.name for t in self.teachers.models}
        actors = self.cache.actors_per_teacher
        for field, names in (("cache.teachers", self.cache.teachers or []), ("cache.layers", list(self.cache.layers)),
                             ("cache.actors_per_teacher", list(actors) if isinstance(actors, dict) else []),
                             ("method.teachers", self.method.teachers or []),
                             ("method.teacher_weights", list(self.method.teacher_weights or {}) if isinstance(
                                 self.method.teacher_weights, dict) else [])):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"{field} names unknown teachers {unknown}; teachers.models has {sorted(known)}")
        return self


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|\d+))*$")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (['a', 'b', 0, 'c'], value); the value is typed by YAML (3, 0.1, true, [1, 2], null)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        raise ConfigError(
            f"bad override {text!r}: expected key=value with a dotted key, e.g. teachers.optim.epochs=5"
        )
    try:
        value = yamlio.load(raw) if raw.strip() else ""
    except yamlio.YamlError as e:
        raise ConfigError(f"bad override {_short(text)}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {_short(text)}: the value is not valid YAML ({e.__class__.__name__})") from None
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    return path, value


def _set_path(tree: dict, path: list[str | int], value: Any, text: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"override {text!r}: no list item {part} at {_dotted(path[:i + 1])}")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {_dotted(path[:i])} is not a mapping")
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"override {text!r}: no list item {last} at {_dotted(path[:-1])}")
    elif not isinstance(node, dict):
        raise ConfigError(f"override {text!r}: {_dotted(path[:-1])} is not a mapping")
    node[last] = value


_REPR = reprlib.Repr()  # bounded reprs of inputs in messages: never the whole of a large input


_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 100, 100


def _short(text: str) -> str:
    return _REPR.repr(text)


def _dotted(loc) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def _format_errors(err: ValidationError, source: str, overrides=()) -> str:
    lines = []
    for e in err.errors():
        key = _dotted(e["loc"])
        # blame the override that set this key (or a parent of it), if any
        hit = [o for o in overrides if key == o.partition("=")[0].strip() or key.startswith(o.partition("=")[0].strip() + ".")]
        if hit:
            source = f"command line override {hit[-1]!r}"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = _REPR.repr(e.get("input"))  # bounded: a whole section's input says nothing more
            got = f" (got {got})" if len(got) <= 120 else ""
            where = f"'{key}': " if e["loc"] else ""
            lines.append(f"{source}: {where}{msg}{got}")
    return "\n".join(lines)


def _read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} is a {'directory' if os.path.isdir(path) else 'special file'}, "
                          "not a YAML file (-c takes a file, e.g. configs/demo.yaml)")
    try:
        raw = yamlio.load_file(path)
    except yamlio.YamlError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not readable ({e.__class__.__name__}: {e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, each layer validated and blamed separately."""
    tree = _read_yaml(path) if path else {}
    try:
        Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, path or "<defaults>")) from None
    if not overrides:
        return _check_compare(Config.model_validate(tree), path or "<defaults>")
    # Overrides land on the file's values with the defaults filled in, so a list item (a teacher) can
    # be addressed by index even when the file did not spell the list out.
    tree = Config.model_validate(tree).model_dump(mode="json", exclude_unset=False)
    given = {}  # method -> the override that sets its options
    for text in overrides:
        p, v = parse_override(text)
        _set_path(tree, p, v, text)
        for path in ([["method", k] for k in v] if p == ["method"] and isinstance(v, dict) else [p]):
            if name := _options_of(path):
                given[name] = f"command line override {_short(text)}"
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "command line override", overrides)) from None
    return _check_compare(_check_method_options(cfg, given), path or "command line")


def _picked_methods(cfg: Config) -> set[str]:
    """The methods a config can train: method.name, and those a run.compare entry or sweep.space picks."""
    names = {cfg.method.name}
    names |= {c["method.name"] for c in cfg.run.compare if isinstance(c.get("method.name"), str)}
    dist = cfg.sweep.space.get("method.name") or {}
    names |= {v for values in dist.values() if isinstance(values, list) for v in values if isinstance(v, str)}
    return names


def _options_of(path: list) -> str | None:
    """The method whose own options `path` (method.<name>[...]) sets, or None."""
    if len(path) > 1 and path[0] == "method" and path[1] in MethodSection.model_fields \
            and path[1] not in MethodBase.model_fields:
        return path[1]
    return None


def _check_method_options(cfg: Config, given: dict[str, str]) -> Config:
    """Options (method.<name>.*) set on the command line for a method the config never trains would be
    ignored: refused. A file may hold several methods' options (a profile that the command line picks from)."""
    picked = _picked_methods(cfg)
    for name, source in given.items():
        if name not in picked:
            raise ConfigError(f"{source}: 'method.{name}' sets options of method {name}, but method.name is "
                              f"{cfg.method.name} and no run.compare entry or sweep.space picks {name}: they would "
                              f"be ignored (set method.name={name}, or drop them)")
    return cfg


def _check_compare(cfg: Config, source: str) -> Config:
    """Every `run.compare` entry must give a valid config: found at load time, not after the teachers ran;
    an entry's own method options must be of the method it trains."""
    for i, changes in enumerate(cfg.run.compare):
        v = variant(cfg, changes, f"{source}: run.compare.{i}")
        for key in changes:
            if (name := _options_of(key.split("."))) and name != v.method.name:
                raise ConfigError(f"{source}: run.compare.{i}: '{key}' sets options of method {name}, but this "
                                  f"entry trains {v.method.name}: they would be ignored")
    return cfg


def variant(cfg: Config, changes: dict[str, Any], source: str) -> Config:
    """`cfg` with `{dotted.key: value}` changes applied and validated; errors are blamed on `source`."""
    tree = cfg.model_dump(mode="json")
    texts = []
    for key, value in changes.items():
        text = f"{key}={value!r}"
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ConfigError(f"{source}: {key!r} is not a dotted config key (e.g. method.name)")
        _set_path(tree, [int(p) if p.isdigit() else p for p in key.split(".")], value, f"{source}: {text}")
        texts.append(text)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: Config, out_dir: str, name: str = "config.resolved.yaml") -> str:
    """Write the fully resolved config next to a stage's outputs; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))
    return path
