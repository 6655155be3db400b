"""The config's sections for what trains from the cache: `method` (with every registered method's options),
`distill`, `professor` and `sweep`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raykd.pipeline.core.schema import NAME_RE, OutputName, Section, Seed, check_endpoint  # noqa: F401  (Section: the base of every section, methods' too)
from raykd.pipeline.core.sections import Arch, OptimSection, WorkersSection


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
