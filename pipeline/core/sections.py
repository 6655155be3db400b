"""The config's sections for where a run goes and what it reads: `run`, `ray`, `data`, the optimiser and
workers shared by every stage, `teachers` and `cache` (each field's default, bounds and description).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_serializer, model_validator

from raykd.pipeline.core.schema import NAME_RE, OutputName, Section, Seed, check_endpoint  # noqa: F401  (Section: the base of every section, methods' too)


def _known_arch(v: str) -> str:
    from raykd.pipeline.models.zoo import check_arch

    check_arch(v)
    return v


# a zoo name (`raykd zoo`), or a model source's torchvision:<name>, timm:<name>, module.path:factory
Arch = Annotated[str, AfterValidator(_known_arch)]


class RunSection(Section):
    imports: list[str] = Field(
        default_factory=list, description="modules imported first, here and in every worker: user code that "
                                          "registers models, datasets or methods (importable from the folder raykd "
                                          "runs in, PYTHONPATH or installed)")
    out_dir: str = Field("runs/default", description="where every stage writes (a local path)")
    storage_path: str | None = Field(
        None, description="the training jobs' checkpoints: a local path or a URI every node reaches "
        "(s3://bucket/prefix; S3 endpoint from cache.s3_endpoint / AWS_ENDPOINT_URL); None = <out_dir>/ray_train")
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compare: list[dict[str, Any]] = Field(
        default_factory=list, description="`raykd run`: one student per entry, each {dotted.key: value} over this config")
    parallel: int | None = Field(
        None, gt=0, description="`raykd run`: students trained at once; None = as many as the CPUs fit, one left for data")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="log every training job's config and per-epoch metrics: TensorBoard event "
                                          "files under <out_dir>/tensorboard, MLflow runs at run.mlflow_uri")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; None = sqlite:///<out_dir>/mlflow.db")
    in_process: bool = Field(
        True, description="a lone one-worker training job (one student, teacher or the professor at a time) on a "
                          "local Ray runs in the command's own process, without starting Ray; false: in a Ray task")

    @field_validator("imports")
    @classmethod
    def _import(cls, v: list[str]) -> list[str]:
        from raykd.pipeline.models.plugins import import_modules

        import_modules(v)  # before the other sections are validated: they may name what these register
        return v


MAX_CPUS_PER_CORE = 16


def max_local_cpus() -> int:
    return max(4, MAX_CPUS_PER_CORE * (os.cpu_count() or 1))


class RaySection(Section):
    address: str | None = Field(None, description="existing cluster; None = RAY_ADDRESS or a new local one")
    num_cpus: int | None = Field(
        None, gt=0, description="logical CPUs of a local Ray (default 2x cores, at least 4: Ray Data needs room under "
                                f"Train; at most {MAX_CPUS_PER_CORE}x cores)")

    @field_validator("num_cpus")
    @classmethod
    def _within_machine(cls, v: int | None) -> int | None:
        cap = max_local_cpus()
        if v is not None and v > cap:
            raise ValueError(f"{v} logical CPUs for a local Ray on this machine's {os.cpu_count()} cores: at most "
                             f"{cap} ({MAX_CPUS_PER_CORE}x the cores; Ray starts workers per logical CPU, so more only "
                             "oversubscribes the cores); a cluster's CPUs come with its nodes (ray.address)")
        return v
    object_store_mb: int | None = Field(None, gt=0)


class DataSection(Section):
    name: str = "digits"
    root: str | None = Field(None, description="dataset folder; None = the dataset's default")
    seed: Seed = Field(0, description="seeds the train/val(/test) split and every view")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="only for datasets without a test split (digits)")
    train_subset: int | None = Field(None, gt=0, description="keep this many training samples (seeded)")
    test_subset: int | None = Field(None, gt=0, description="keep this many test samples (seeded): quick benchmarks only")
    image_size: int | None = Field(None, gt=0, description="imagefolder, webdataset and parquet: resize + centre-crop to this")
    in_memory: bool = Field(False, description="imagefolder only: decode the whole folder into memory once "
                                               "(small folders) instead of streaming its files")
    mean: list[float] | None = Field(None, description="per-channel mean in [0, 1]; None = measured on the training "
                                                        "split (for a large image folder, a full decoding pass)")
    std: list[float] | None = Field(None, description="with `mean`")
    pad: int | None = Field(None, ge=0, description="view policy: pad then crop back; None = dataset default")
    flip: bool | None = Field(None, description="view policy: random horizontal flip; None = dataset default")
    view_policy: Literal["pad_crop", "random_resized_crop"] = Field(
        "pad_crop", description="pad_crop: pad + crop back (+ flip); random_resized_crop: torchvision's "
                                "RandomResizedCrop (+ flip) drawn from the view's hash, resized to the image size")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized_crop: share of the area")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random_resized_crop: aspect ratio range")

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from raykd.pipeline.data.datasets import DATASETS

        DATASETS.check(v)
        return v


class OptimSection(Section):
    epochs: int = Field(15, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = True
    schedule: Literal["onecycle", "cosine", "constant", "multistep"] = "onecycle"
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210], description="multistep: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: lr factor at each milestone")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this (none: no clipping)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the model's forward under torch.autocast: bf16 (CPU or CUDA) or fp16 (CUDA only, with "
                            "loss scaling); losses are computed in fp32")

    @model_validator(mode="after")
    def _multistep_only(self):
        extra = sorted({"milestones", "gamma"} & self.model_fields_set)
        if extra and self.schedule != "multistep":
            raise ValueError(f"{' and '.join(extra)} appl{'y' if len(extra) > 1 else 'ies'} only to schedule: multistep (schedule is {self.schedule})")
        return self

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler):
        """milestones/gamma only exist for multistep: other schedules keep the fingerprints they had."""
        d = handler(self)
        if self.schedule != "multistep":
            d.pop("milestones", None)
            d.pop("gamma", None)
        if self.grad_clip is None:  # added later: runs without clipping keep their fingerprints
            d.pop("grad_clip", None)
        if self.precision == "fp32":  # likewise
            d.pop("precision", None)
        return d


class WorkersSection(Section):
    """The workers of one training job: one (a Ray task, or this process) or several (Ray Train, DDP)."""

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0, description="used only when the device is cuda")
    max_failures: int = Field(1, ge=0, description="worker failures a job survives by restarting from its checkpoint")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the workers (SPREAD: one per node where possible)")
    torch_threads: int | None = Field(None, gt=0, description="torch threads per worker; None = node cores / workers on it")


class TeacherSpec(Section):
    name: str = Field(pattern=NAME_RE)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == "ensemble":
            raise ValueError("'ensemble' is the cache's name for the teachers' mean (cache.topk.of); name the teacher otherwise")
        return v

    arch: Arch
    seed: Seed = 0
    checkpoint: str | None = Field(
        None, description="load and evaluate this state dict instead of training: a .safetensors or torch.save file, "
                          "torchvision:<Weights>.<NAME> from the torch hub cache or timm:<name> from the Hugging Face "
                          "cache (never downloaded)")
    checkpoint_key_map: dict[str, str | None] = Field(
        default_factory=dict, description="rename the checkpoint's keys by prefix before loading, first match wins: "
                                          "{old: new}; new = null drops the key (e.g. {'module.': '', 'aux.': null})")
    epochs: int | None = Field(None, gt=0, description="overrides teachers.optim.epochs for this teacher")
    lr: float | None = Field(None, gt=0, description="overrides teachers.optim.lr for this teacher")
    image_size: int | None = Field(None, gt=0, description="this teacher's input size: images resized to it "
                                                           "(training, evaluation, cache); None = the data set's")
    mean: list[float] | None = Field(None, description="this teacher's normalisation (e.g. ImageNet's "
                                                        "[0.485, 0.456, 0.406]); None = the data set's")
    std: list[float] | None = Field(None, description="with `mean`")

    @model_validator(mode="after")
    def _mean_with_std(self) -> "TeacherSpec":
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError("a teacher's mean and std come together, with one value per channel each")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std values must be positive")
        return self

    def preprocess(self) -> dict | None:
        """{image_size, mean, std} when any is set (kept in the teacher's record)."""
        d = {k: getattr(self, k) for k in ("image_size", "mean", "std") if getattr(self, k) is not None}
        return d or None


def _default_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec(name="resnet8", arch="resnet8", seed=1),
        TeacherSpec(name="wrn_16_2", arch="wrn_16_2", seed=2),
        TeacherSpec(name="cnn32", arch="cnn32", seed=3),
    ]


class TeachersSection(Section):
    models: list[TeacherSpec] = Field(default_factory=_default_teachers, min_length=1)
    optim: OptimSection = Field(default_factory=OptimSection)
    workers: WorkersSection = Field(default_factory=WorkersSection)
    min_val_acc: float = Field(0.0, ge=0, le=1, description="accuracy gate: a teacher below it may not be cached")
    parallel: int | None = Field(None, gt=0, description="teachers trained at once; None = as run.parallel's default")

    @model_validator(mode="after")
    def _unique_names(self) -> "TeachersSection":
        names = [t.name for t in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dup)}")
        return self


class TopKSection(Section):
    """Top-k soft targets (FKD's): the k largest probabilities at `temperature` and their classes."""

    k: int = Field(gt=0, description="classes kept per row")
    of: Literal["teachers", "ensemble"] = Field(
        "teachers", description="each teacher's top-k, or one top-k of the teachers' mean probabilities")
    temperature: float = Field(4.0, gt=0, description="tau of the stored probabilities (the methods' default)")


MAX_VIEWS = 1024  # a student cycles through them: more views than epochs adds nothing but rows


class CacheSection(Section):
    """The teacher cache: K views of every training sample, each teacher's outputs as Parquet columns."""

    uri: str | None = Field(None, description="local path or s3://bucket/prefix; None = <run.out_dir>/cache")
    views: int = Field(4, gt=0, description="K: views per training sample (epoch e of a student uses view e "
                                                         f"mod K; at most {MAX_VIEWS})")
    teachers: list[str] | None = Field(None, description="teachers to cache (names); None = all of teachers.models")
    store_views: bool | None = Field(
        None, description="store each view's uint8 pixels (else replay them from the record); None = store them for "
                          "pad_crop views, keep only the records of random_resized_crop ones (FKD's layout)")

    @field_validator("views")
    @classmethod
    def _views_bounded(cls, v: int) -> int:
        if v > MAX_VIEWS:
            raise ValueError(f"{v} views: at most {MAX_VIEWS} (a student's epoch e reads view e mod K, so views beyond "
                             "its epochs are never read, and each costs a full pass of every teacher)")
        return v

    def stores_views(self, policy) -> bool:
        return self.store_views if self.store_views is not None else policy.kind == "pad_crop"
    logits: bool = Field(True, description="store every teacher's full logits (fp16, C values per row)")
    topk: TopKSection | None = Field(
        None, description="also (or, with logits: false, only) store top-k probabilities: {k, of, temperature}; "
                          "a number is k")
    layers: dict[str, list[str]] = Field(default_factory=dict, description="teacher -> stage names to cache as features")
    feat_dtype: Literal["fp16", "int8"] = "fp16"
    batch_size: int = Field(256, gt=0)
    actors_per_teacher: int | dict[str, int] = Field(
        1, description="actors in each teacher's pool: one number, or {teacher: n} (default 1 for the others)")
    threads_per_actor: int | None = Field(None, gt=0, description="torch threads per actor; None = the node's cores")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(1.0, ge=0, description="used only when the device is cuda")
    rows_per_file: int = Field(20_000, gt=0, description="about this many rows per Parquet file (a hint to Ray Data)")
    s3_endpoint: Annotated[str | None, AfterValidator(check_endpoint)] = Field(
        None, description="S3-compatible endpoint for cache.uri and run.storage_path (else AWS_ENDPOINT_URL / AWS default)")
    views_per_pass: int | None = Field(
        None, gt=0, description="views built per pass (and committed together); None = one with the local engine "
                            "(a student can start on each as it is committed), all missing with Ray Data")
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="local: the teachers run in this process, no Ray; ray: a Ray Data pipeline, an actor pool "
                            "per teacher; auto: local unless the data is a streamed folder, a teacher has more than "
                            "one actor, or raykd runs on a cluster")

    @field_validator("topk", mode="before")
    @classmethod
    def _topk_number(cls, v):
        return {"k": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _some_targets(self):
        if not self.logits and self.topk is None:
            raise ValueError("cache.logits is false and cache.topk unset: the cache would hold no teacher targets; "
                             "set cache.topk (e.g. {k: 5}) or keep the logits")
        return self

    @field_validator("actors_per_teacher")
    @classmethod
    def _positive_actors(cls, v):
        bad = [n for n in ([v] if isinstance(v, int) else v.values()) if n < 1]
        if bad:
            raise ValueError("cache.actors_per_teacher must be at least 1 per teacher")
        return v

    def actors(self, teacher: str) -> int:
        a = self.actors_per_teacher
        return a if isinstance(a, int) else a.get(teacher, 1)

    @field_validator("layers")
    @classmethod
    def _no_empty_layers(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for t, ls in v.items():
            if not ls:
                raise ValueError(f"cache.layers.{t} is empty: list stage names or drop the teacher")
        return v
