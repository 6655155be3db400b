"""One typed config for every stage: defaults in code, a YAML overrides them, `key=value` overrides the YAML.

Unknown keys and wrong types are errors that name the key and where it came from (file or command line).
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from raykd.pipeline.core import yamlio
from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.core.schema import (  # noqa: F401  (Section: the base of every section, methods' too)
    NAME_RE,
    OutputName,
    Section,
    Seed,
    check_endpoint,
)


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


class CombineWeights(Section):
    teachers: float = Field(0.5, ge=0)
    professor: float = Field(0.5, ge=0)


ENSEMBLES = ("mean_prob", "mean_logit", "weighted", "per_teacher", "ca_mkd", "entropy", "ae_kd")


class MethodBase(Section):
    """The distillation method: `name` picks it; what every logit method shares is here (the teachers'
    ensemble, the targets); each method's own options live under its name (method.dkd.beta), declared by
    the method itself (`Method.Options`, in its file under methods/)."""

    name: str = "kd"
    teachers: list[str] | None = Field(None, description="teachers to distil from; None = all cached ones")
    ensemble: Literal[ENSEMBLES] = Field(  # type: ignore[valid-type]
        "mean_prob", description="how several teachers make one target (methods/ensemble.py): mean_prob, mean_logit, "
                                 "weighted, per_teacher, or per sample ca_mkd, entropy (EBKD), ae_kd (capped min-norm)")
    teacher_weights: dict[str, float] | Literal["val_acc"] | None = Field(
        None, description="for ensemble=weighted: fixed weights per teacher, or val_acc (the default)")
    weight_temperature: float | None = Field(
        None, gt=0, description="ensemble=weighted by val_acc: weights softmax(val_acc / T); None = proportional")
    ae_kd_cap: float = Field(0.6, gt=0, le=1, description="ensemble=ae_kd: the upper bound C on a teacher's weight "
                                                          "(the official code's default; below 1/K reads as 1/K)")
    targets: Literal["teachers", "refined", "both", "label_mix"] = Field(
        "teachers", description="distil from the teachers, the professor's refined targets (replace), both (combine), "
                                "or label_mix: the teachers' target mixed half and half with the one-hot label (a baseline)")
    combine: CombineWeights = Field(default_factory=CombineWeights, description="weights of targets=both")

    @field_validator("name")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from raykd.methods import METHODS

        METHODS.check(v)
        return v

    @model_validator(mode="after")
    def _weight_temperature_use(self):
        if self.weight_temperature is not None and self.ensemble != "weighted":
            raise ValueError(f"weight_temperature applies only to ensemble: weighted (ensemble is {self.ensemble})")
        return self

    def own(self) -> dict:
        """The fingerprinted part: the shared fields and the chosen method's own options only (a change to
        method.dkd.* does not make a KD student stale, nor does ae_kd's cap one of another ensemble)."""
        d = self.model_dump(mode="json")
        if self.ensemble != "ae_kd":
            d.pop("ae_kd_cap")
        return {k: v for k, v in d.items() if k in MethodBase.model_fields or k == self.name}


def _method_section() -> type[MethodBase]:
    """MethodBase plus one field per registered method that declares options: `method.<name>`."""
    from pydantic import create_model
    from raykd.methods import METHODS

    fields = {name: (cls.Options, Field(default_factory=cls.Options, description=(cls.Options.__doc__ or "").strip()))
              for name, cls in METHODS.items() if cls.Options is not None}
    return create_model("MethodSection", __base__=MethodBase, **fields)


MethodSection = _method_section()


def _default_distill_optim() -> OptimSection:
    return OptimSection(epochs=12, batch_size=64, lr=0.05)


class StudentSpec(Section):
    arch: Arch = "cnn8"
    seed: Seed | None = Field(None, description="initialisation and shuffling seed; None = run.seed")


class DistillSection(Section):
    """One student's distillation, from the cache or with the teachers online."""

    name: OutputName | None = Field(None, description="output folder under <out_dir>/students; None = <method>-<arch>-s<seed>")
    student: StudentSpec = Field(default_factory=StudentSpec)
    teachers: Literal["cache", "online"] = Field(
        "cache", description="read teacher outputs from the cache, or run the teachers inside the workers")
    optim: OptimSection = Field(default_factory=_default_distill_optim)
    workers: WorkersSection = Field(default_factory=WorkersSection)
    shuffle_buffer: int = Field(
        2048, ge=0, description="streamed views: rows in each worker's local shuffle buffer; in memory every epoch is "
                                "a full seeded permutation; 0 = no shuffling either way")
    in_memory: bool | Literal["auto"] = Field(
        "auto", description="hold each worker's share of the views it trains on in memory (read once, batched by "
                            "indexing), or stream them through Ray Data; auto: in memory when they fit a quarter "
                            "of the available memory")
    device_views: bool | Literal["auto"] = Field(
        "auto", description="on CUDA, hold the in-memory views on the device (batches indexed there, no copy per "
                            "step); auto: when they take at most half its free memory; else batches are copied from "
                            "pinned host memory. Views replayed from records stay on the host")
    test_every: int = Field(
        1, ge=0, description="evaluate the test split every N epochs and always after the last; 0 = after the last "
                             "only (the validation split is evaluated every epoch). Training is the same either way")


class ProfessorOptim(Section):
    epochs: int = Field(8, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0, description="Adam, for the refiner and the discriminators alike")


class ProfessorSection(Section):
    """The CAAE professor (methods/professor.py): trained on the cached teacher targets, then adds the cache's
    `refined` column."""

    temperature: float = Field(4.0, gt=0, description="tau of the teachers' soft targets q_t")
    ensemble: Literal["mean_prob", "ca_mkd", "entropy"] = Field(
        "mean_prob", description="how the teachers' probabilities make q (methods/ensemble.py)")
    latent_dim: int | None = Field(None, gt=0, description="latent width, narrower than the classes; None = classes // 2")
    hidden: int = Field(64, gt=0)
    w_rec: float = Field(1.0, ge=0, description="KL(q || softmax r) on the samples the teachers got right")
    w_cls: float = Field(0.0, ge=0, description="CE(r, y); above 0 it pulls the optimum towards the label mix")
    w_z: float = Field(0.1, ge=0, description="adversarial weight of the latent prior (per class)")
    w_q: float = Field(0.1, ge=0, description="adversarial weight of the output discriminator")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of the training samples kept out of the professor's "
                                                       "training, to measure its refined targets on")
    seed: Seed = 0
    optim: ProfessorOptim = Field(default_factory=ProfessorOptim)
    workers: WorkersSection = Field(default_factory=WorkersSection)
    actors: int = Field(1, gt=0, description="actors of the pool that writes the refined column")
    cpus_per_actor: float = Field(1.0, gt=0)


DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class SweepSection(Section):
    """`raykd sweep`: Ray Tune trials of `raykd distill`, all reading one cache, selected on validation."""

    name: OutputName | None = Field(None, description="folder under <out_dir>/sweeps; None = sweep-<hash of the sweep>")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="{dotted.key: {grid|choice: [values]} or {uniform|loguniform|randint: [lo, hi]}}")
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="grid: every dimension a grid or a choice, all combinations; optuna: Optuna's TPE "
                              "sampler (Ray Tune's OptunaSearch), seeded, sweep.max_concurrent trials at a time")
    num_samples: int = Field(4, gt=0, description="random/optuna: trials (random: grids are crossed with each); "
                                                   "grid: repeats of the grid")
    metric: str = Field("val_acc", description="what selects the best trial: a validation or training metric, never test")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = Field("none", description="asha: stop poor trials early on the metric, per epoch")
    grace_period: int = Field(2, gt=0, description="asha: epochs every trial runs before it may be stopped")
    reduction_factor: int = Field(2, gt=1)
    max_concurrent: int | None = Field(None, gt=0, description="trials at once; None = as many as the CPUs fit, one left for data")
    seed: Seed = Field(0, description="seeds the random search")

    @field_validator("name")
    @classmethod
    def _room_for_trials(cls, v: str | None) -> str | None:
        if v is not None and len(v) > 80:
            raise ValueError(f"at most 80 characters (each trial's student is named <sweep name>-<trial id>); "
                             f"this one has {len(v)}")
        return v

    @field_validator("metric")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if v.startswith("test"):
            raise ValueError("sweeps select on validation (or training) metrics, never on the test split")
        if v not in ("val_acc", "val_loss", "train_acc", "train_loss"):
            raise ValueError(f"unknown metric {v!r}; use val_acc, val_loss, train_acc or train_loss")
        return v


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


# --------------------------------------------------------------------------------------------------
# loading

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
