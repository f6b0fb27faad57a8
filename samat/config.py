"""Pydantic models for one run and for a grid of runs; YAML loading with one-line errors."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from samat import safeyaml
from samat.errors import ConfigError  # re-exported: samat.config.ConfigError


def parse_budget(value: Any) -> Any:
    """Accept '8/255', '8 / 255' and plain numbers for attack budgets and step sizes."""
    if isinstance(value, str):
        try:
            if "/" in value:
                numerator, denominator = value.split("/", 1)
                if "/" in denominator:
                    raise ValueError(value)
                return float(Fraction(numerator.strip()) / Fraction(denominator.strip()))
            return float(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{value!r} is not a number or a fraction such as '8/255'") from None
    return value


def format_budget(eps: float) -> str:
    """'8/255' when eps is a whole number of 255ths below 1, else a short decimal ('0.5')."""
    units = eps * 255
    if 0 < eps < 1 and abs(units - round(units)) < 1e-6:
        return f"{round(units)}/255"
    return f"{eps:.4g}"


Budget = Annotated[float, BeforeValidator(parse_budget), Field(ge=0)]
PositiveBudget = Annotated[float, BeforeValidator(parse_budget), Field(gt=0)]
Norm = Literal["linf", "l2"]


# C0 control characters and DEL: in a value that reaches the sbatch script (one `#SBATCH` line
# per option, setup lines) or a command line, a newline or NUL would cut or inject a line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL", "\t": "a tab"}


def control_character(text: str) -> str | None:
    """A description of the first control character in text ('a newline', 'U+001B'), or None."""
    match = _CONTROL.search(text)
    if match is None:
        return None
    char = match.group()
    return _CONTROL_NAMES.get(char, f"control character U+{ord(char):04X}")


def _plain_text(value: Any) -> Any:
    found = control_character(str(value)) if isinstance(value, str | Path) else None
    if found:
        raise ValueError(
            f"contains {found}, which the sbatch script or a command line cannot carry"
        )
    return value


def _plain_mapping(value: dict[Any, Any]) -> dict[Any, Any]:
    """Keys and (nested) string values of a mapping without control characters."""

    def check(item: Any, key: Any) -> None:
        if isinstance(item, dict):
            for inner_key, inner in item.items():
                check(inner_key, inner_key)
                check(inner, inner_key)
        elif isinstance(item, list | tuple):
            for inner in item:
                check(inner, key)
        elif isinstance(item, str) and control_character(item):
            where = f"the key {item!r}" if item == key else f"the value of {key!r} ({item!r})"
            raise ValueError(
                f"{where} contains {control_character(item)}, which the sbatch script or a "
                "command line cannot carry"
            )

    check(value, None)
    return value


# A string that goes into the sbatch script or onto a command line: no control characters.
PlainText = Annotated[str, AfterValidator(_plain_text)]
PlainPath = Annotated[Path, AfterValidator(_plain_text)]


def _label_text(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; give it a name, or leave it out")
    return value


def _path_safe(value: str) -> str:
    """A name that becomes one path component (results/<name>) and a job name."""
    if value.strip() in (".", "..") or "/" in value or "\\" in value:
        raise ValueError(
            f"{value!r} is not a plain name: it is used as a folder name (results/<name>) and "
            "may not contain '/' or be '.' or '..'; set output for another place"
        )
    return value


# A label shown in tables, logs and reports: no control characters, not empty.
Label = Annotated[str, AfterValidator(_plain_text), AfterValidator(_label_text)]
# A name that is also a folder name and part of SLURM's job name.
Name = Annotated[Label, AfterValidator(_path_safe)]


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Each data set belongs to one task; the task decides the models, loss, metrics and attacks.
TASK_DATA: dict[str, tuple[str, ...]] = {
    "image": ("digits", "synthetic", "cifar10", "cifar100", "tinyimagenet"),
    "segmentation": ("stanford_background", "voc2012"),
    "text": ("rotten_tomatoes",),
}
DataName = Literal[
    "digits",
    "synthetic",
    "cifar10",
    "cifar100",
    "tinyimagenet",
    "stanford_background",
    "voc2012",
    "rotten_tomatoes",
]
STAGED_DATA = ("cifar10", "cifar100", "tinyimagenet", *TASK_DATA["segmentation"], "rotten_tomatoes")


def task_of(data_name: str) -> str:
    """'image', 'segmentation' or 'text': the task a data set belongs to."""
    return next(task for task, names in TASK_DATA.items() if data_name in names)


class GenerateConfig(Strict):
    """A tiny generated look-alike of a staged data set, written to `data.root` in the data set's
    released layout when the root holds none, then read back by the real loader (examples,
    tests; segmentation and text only)."""

    # images (segmentation: split 80/20 as for the real set) or sentences (text: per polarity)
    n_examples: int = Field(default=40, ge=10)
    # side of the generated images (segmentation)
    size: int = Field(default=48, ge=16)
    seed: int = 0


class DataConfig(Strict):
    name: DataName = "digits"
    root: Path | None = None
    # None = the data set's usual augmentation: crop padding 4 + flip on natural images,
    # none on digits (digits are not flip-invariant).
    crop_padding: int | None = Field(default=None, ge=0)
    # What fills the crop's padding: zeros (samat's first loaders) or the image mirrored at its
    # border, torchvision's padding_mode='reflect' (the authors' loaders, SAM_AT utils.py:28).
    crop_padding_mode: Literal["zeros", "reflect"] = "zeros"
    flip: bool | None = None
    # Subsets keep the first n examples of a fixed permutation, for quick runs.
    train_size: int | None = Field(default=None, gt=0)
    test_size: int | None = Field(default=None, gt=0)
    # Only for `synthetic`: image shape and class count of the generated data.
    image_size: int = Field(default=8, gt=0)
    channels: int = Field(default=1, gt=0)
    num_classes: int = Field(default=10, ge=2)
    # Segmentation: side of the cached square split (None = 320 Stanford Background, 512 VOC),
    # training crop side (None = the whole image) and random scale range (None = no scaling).
    size: int | None = Field(default=None, ge=8)
    crop_size: int | None = Field(default=None, ge=8)
    scale_range: tuple[PositiveBudget, PositiveBudget] | None = None
    # Text: tokens per example after tokenization (longer reviews are truncated).
    max_length: int = Field(default=128, ge=8)
    generate: GenerateConfig | None = None

    @property
    def task(self) -> str:
        return task_of(self.name)

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.name in STAGED_DATA and self.root is None:
            raise ValueError(
                f"data set {self.name!r} needs `data.root`, the directory that holds it"
            )
        if self.generate is not None and self.task == "image":
            raise ValueError(
                f"data.generate applies to segmentation and text data sets, not {self.name!r}; "
                "remove it (digits and synthetic need no files)"
            )
        if self.scale_range is not None and self.scale_range[0] > self.scale_range[1]:
            raise ValueError("data.scale_range is [low, high] with low <= high, e.g. [0.5, 2.0]")
        return self


class ModelConfig(Strict):
    name: str = "small_cnn"
    width: int | None = Field(default=None, gt=0)
    # Staged weights: the segmentation backbone's ImageNet weights (.safetensors or a weights-only
    # .pth), or the text model's directory (config.json, safetensors weights, tokenizer files).
    pretrained: PlainPath | None = None


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = False


class ScheduleConfig(Strict):
    # The papers' schedule: lr / 10 at 75% and again at 90% of the epochs. Per step: poly
    # (lr (1 - t / T) ^ power, segmentation) and linear (warmup, then linear decay to 0, text).
    name: Literal["multistep", "constant", "cosine", "poly", "linear"] = "multistep"
    milestones: list[float] = Field(default_factory=lambda: [0.75, 0.9])
    gamma: float = Field(default=0.1, gt=0)
    warmup_epochs: int = Field(default=0, ge=0)
    power: float = Field(default=0.9, gt=0)
    # linear: the fraction of all steps spent warming up from 0
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _milestones_are_fractions(self) -> ScheduleConfig:
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ValueError("schedule.milestones are fractions of the epochs, each in (0, 1]")
        return self


# The method registry's torch-free half: each method config class owns its row label and its
# place in the papers' row order (standard training, SAM variants, adversarial training); the
# code for each name is samat.methods.METHODS.


class StandardMethod(Strict):
    name: Literal["standard"] = "standard"

    def label(self) -> str:
        return ""  # the row is named by its optimizer alone: 'SGD', 'Adam'

    def rank(self) -> int:
        return 0


# ASAM's named variants, method.variant in a config (it sets eta and scaled, which are stored).
ASAM_VARIANTS: dict[str, dict[str, Any]] = {
    # SAM_AT's sam.py:24,53 (davda54/sam, adaptive=True): T_w = |w| on every parameter
    "authors": {"eta": 0.0, "scaled": "all"},
    # SamsungLabs/ASAM asam.py:22-25: T_w = |w| + 0.01 on parameters named '*weight*'
    "kwon": {"eta": 0.01, "scaled": "weights"},
}


class SAMMethod(Strict):
    name: Literal["sam", "asam"]
    rho: PositiveBudget = 0.05
    # ASAM's small constant keeping |w| scaling away from zero (Kwon et al. 2021). The default
    # (0.01 on every parameter) is samat's first ASAM and matches no reference: the paper grids
    # name a variant.
    eta: float = Field(default=0.01, ge=0)
    # Which parameters ASAM's T_w = |w| + eta scales: all, or only those whose name holds
    # 'weight' (biases unscaled, T = 1), as Kwon et al.'s released asam.py does.
    scaled: Literal["all", "weights"] = "all"

    @model_validator(mode="before")
    @classmethod
    def _named_variant(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "variant" not in data:
            return data
        data = dict(data)
        variant = data.pop("variant")
        if data.get("name") != "asam":
            raise ValueError("method.variant names an ASAM variant; remove it or use name asam")
        if variant not in ASAM_VARIANTS:
            raise ValueError(
                f"method.variant {variant!r} is unknown; choose one of {', '.join(ASAM_VARIANTS)}"
            )
        for key, value in ASAM_VARIANTS[variant].items():
            if key in data and data[key] != value:
                raise ValueError(
                    f"method.variant {variant!r} sets {key} to {value!r}; remove method.{key}"
                )
            data[key] = value
        return data

    def variant(self) -> str | None:
        """The ASAM variant these settings are ('authors', 'kwon'), or None."""
        own = {"eta": self.eta, "scaled": self.scaled}
        return next((name for name, values in ASAM_VARIANTS.items() if values == own), None)

    def label(self) -> str:
        head = f"{self.name.upper()} rho={self.rho:g}"
        if self.name == "sam" or (self.eta, self.scaled) == (0.01, "all"):
            return head  # samat's first ASAM keeps its label
        variant = self.variant()
        return f"{head} ({variant})" if variant else f"{head} eta={self.eta:g} {self.scaled}"

    def rank(self) -> int:
        return 1 if self.name == "sam" else 3


class ESAMMethod(Strict):
    """Efficient SAM (Du et al. 2022): stochastic weight perturbation + sharpness-sensitive data
    selection."""

    name: Literal["esam"]
    rho: PositiveBudget = 0.05
    # SWP: each parameter tensor is perturbed with probability beta (and scaled by 1 / beta).
    beta: float = Field(default=0.6, gt=0, le=1)
    # SDS: the second pass uses the fraction gamma of the batch whose loss rose the most.
    gamma: float = Field(default=0.5, gt=0, le=1)
    # How many examples SDS keeps of a batch of B: 'ceil' = ceil(gamma B); 'official' = the
    # authors' code (Efficient_SAM utils/Esam.py:94-104): int(gamma B) - 1 (those strictly above
    # the int(gamma B)-th largest rise), the whole batch when gamma >= 0.99.
    subset: Literal["ceil", "official"] = "ceil"

    def label(self) -> str:
        official = " (official SDS)" if self.subset == "official" else ""
        return f"ESAM rho={self.rho:g}" + _non_default(self, "beta", "gamma") + official

    def rank(self) -> int:
        return 2


class LookSAMMethod(Strict):
    """LookSAM (Liu et al. 2022): SAM's gradient every k steps, its stored orthogonal part reused
    in between."""

    name: Literal["looksam"]
    rho: PositiveBudget = 0.05
    k: int = Field(default=5, ge=1)
    # weight of the reused orthogonal component, scaled by ||g|| / ||g_v|| (the paper's alpha)
    alpha: float = Field(default=0.7, ge=0)

    def label(self) -> str:
        return f"LookSAM rho={self.rho:g} k={self.k}" + _non_default(self, "alpha")

    def rank(self) -> int:
        return 4


class AdversarialMethod(Strict):
    """PGD adversarial training (Madry et al.) or FGSM with random start ('fast AT')."""

    name: Literal["pgd_at", "fgsm_at"]
    norm: Norm = "linf"
    eps: PositiveBudget = 8 / 255
    # None = eps / 4 (l_inf) or eps / 8 (l_2) for PGD, 1.25 eps for FGSM-RS (Wong et al. 2020).
    alpha: Budget | None = None
    steps: int = Field(default=10, ge=1)
    random_start: bool = True
    # The l_2 random start: 'ball' = uniform in the eps ball (radius eps U^(1/d)); 'radial' = a
    # normalised Gaussian direction times eps U(0, 1), the authors' and robust_overfitting's
    # (SAM_AT utils.py:77-81, train_cifar.py:80-83). l_inf draws uniformly in the cube either way.
    l2_start: Literal["ball", "radial"] = "ball"

    def label(self) -> str:
        kind = "PGD-AT" if self.name == "pgd_at" else "FGSM-AT"
        start = " start=radial" if self.norm == "l2" and self.l2_start == "radial" else ""
        return f"{kind} {self.norm} eps={format_budget(self.eps)}{start}"

    def rank(self) -> int:
        return 5 if self.name == "fgsm_at" else 6


def _non_default(method: BaseModel, *fields: str) -> str:
    return "".join(
        f" {name}={getattr(method, name):g}"
        for name in fields
        if getattr(method, name) != type(method).model_fields[name].default
    )


METHOD_CLASSES = (StandardMethod, SAMMethod, ESAMMethod, LookSAMMethod, AdversarialMethod)
METHOD_NAMES = tuple(
    name for cls in METHOD_CLASSES for name in get_args(cls.model_fields["name"].annotation)
)

MethodConfig = Annotated[
    StandardMethod | SAMMethod | ESAMMethod | LookSAMMethod | AdversarialMethod,
    Field(discriminator="name"),
]


class AttackSpec(Strict):
    # a kind in samat.attacks.kinds.KINDS: fgsm, pgd, autoattack, fab, square, pixle, stadv, ...
    attack: str
    norm: Norm = "linf"
    eps: Budget = 8 / 255
    steps: int | None = Field(default=None, ge=1)
    # None = the attack's convention (PGD: eps / 4 for l_inf, eps / 8 for l_2).
    alpha: Budget | None = None
    # Column label in reports; None = a label made from attack, norm and eps.
    label: Label | None = None
    # Further keyword arguments for the torchattacks class (checked when the attack is built).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("attack")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from samat.attacks.kinds import KINDS  # the attack registry (torch-free)

        if value not in KINDS:
            raise ValueError(f"unknown attack {value!r}; choose one of {', '.join(KINDS)}")
        return value


class ValidationConfig(Strict):
    """A held-out part of the training set, evaluated every `every` epochs (Rice et al. 2020)."""

    # Examples taken out of the training set (a fixed draw); 0 = no validation.
    size: int = Field(default=0, ge=0)
    every: int = Field(default=1, ge=1)
    # None = PGD-10 at the adversarial-training method's norm and eps; clean accuracy for the
    # other methods. Otherwise an attack spec or a preset name.
    attack: AttackSpec | str | None = None
    # FGSM-RS catastrophic overfitting: validation robust accuracy below this fraction of its best
    # so far (Wong et al. 2020) is recorded with its epoch.
    collapse_ratio: float = Field(default=0.5, gt=0, lt=1)


class TrainConfig(Strict):
    epochs: int = Field(default=100, ge=1)
    # Training by optimizer steps instead (segmentation): the epochs are as many as the steps
    # need, the last one cut short; set one of epochs and iterations.
    iterations: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    # Mixed precision: every forward under autocast in bf16, or in fp16 with a GradScaler (its
    # scale is checkpointed); off = float32. true/false are read as bf16/off.
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    # torch.compile the model (the first steps of each pass kind pay for the compilation).
    compile: bool = False
    # Bitwise-reproducible kernels; slower on GPU, needed for exact resume checks.
    deterministic: bool = False
    # Which weights the evaluations attack: the last epoch's, or the validation-best epoch's.
    keep: Literal["last", "best"] = "last"
    validation: ValidationConfig = Field(default_factory=lambda: ValidationConfig())

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value: Any) -> Any:
        if value is True:
            return "bf16"
        return "off" if value is False else value

    @model_validator(mode="after")
    def _epochs_or_iterations(self) -> TrainConfig:
        if self.iterations is not None and "epochs" in self.model_fields_set:
            raise ValueError("set train.epochs or train.iterations, not both")
        return self

    def total_epochs(self, steps_per_epoch: int) -> int:
        """Epochs to train: `epochs`, or as many as `iterations` steps need."""
        if self.iterations is None:
            return self.epochs
        return -(-self.iterations // steps_per_epoch)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.iterations or self.epochs * steps_per_epoch

    @model_validator(mode="after")
    def _best_needs_validation(self) -> TrainConfig:
        if self.keep == "best" and self.validation.size == 0:
            raise ValueError(
                "train.keep 'best' needs a validation split: set train.validation.size (e.g. 1000)"
            )
        return self


class EvalConfig(Strict):
    # Entries are attack specs or names of presets (see samat.attacks.PRESETS).
    attacks: list[AttackSpec | str] = Field(default_factory=list)
    # Attacks run on n test examples: the first n, or n drawn with `subset_seed`. Clean accuracy
    # is recorded on the whole test set and on these n.
    n_examples: int = Field(default=1000, ge=1)
    subset_seed: int | None = None
    batch_size: int = Field(default=256, ge=1)
    # Which mean / std classify the attacked images: the model's own ('data'), or CIFAR-10's
    # ('cifar10'), as the authors' eval_cifar100.py does for CIFAR-100 (its PGD uses CIFAR-100's
    # statistics, line 14-18, the final prediction CIFAR-10's, line 33): to measure the difference.
    scoring_stats: Literal["data", "cifar10"] = "data"
    # Which checkpoint to attack; None = the one train.keep selects.
    checkpoint: Literal["last", "best"] | None = None


class RunConfig(Strict):
    """One run: what determines the trained weights (its hash is the run id) plus `eval`, the
    evaluation request, which is not part of the identity."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=StandardMethod)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # Trackers that mirror metrics.jsonl (docs/trackers.md); like eval, not part of the run id.
    track: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    seed: int = 0

    @property
    def task(self) -> str:
        """'image', 'segmentation' or 'text', from the data set."""
        return self.data.task

    @model_validator(mode="after")
    def _scoring_stats_on_cifar100(self) -> RunConfig:
        if self.eval.scoring_stats != "data" and self.data.name != "cifar100":
            raise ValueError(
                "eval.scoring_stats 'cifar10' reproduces the authors' CIFAR-100 evaluation; "
                f"remove it for {self.data.name!r}"
            )
        return self

    @model_validator(mode="after")
    def _fits_task(self) -> RunConfig:
        task = self.task
        a_task = f"{'an' if task == 'image' else 'a'} {task} run"
        if task == "text" and isinstance(self.method, AdversarialMethod):
            raise ValueError(
                f"method {self.method.name!r} perturbs pixels; a text run's inputs are tokens: "
                "use standard, sam, asam, esam or looksam (word-level attacks go in eval.attacks)"
            )
        if task != "image" and self.train.validation.size:
            raise ValueError(
                f"train.validation applies to image classification, not to {a_task}; "
                "remove it (and train.keep: best)"
            )
        from samat.attacks.kinds import KINDS

        for entry in self.eval.attacks:
            if isinstance(entry, str) and task != "image":
                raise ValueError(
                    f"eval.attacks: preset {entry!r} is an image attack; {a_task} takes "
                    "attack specs of kind "
                    + " or ".join(k for k, v in KINDS.items() if task in v.tasks)
                )
            if isinstance(entry, AttackSpec) and task not in KINDS[entry.attack].tasks:
                fits = [k for k, v in KINDS.items() if task in v.tasks]
                raise ValueError(
                    f"eval.attacks: attack {entry.attack!r} does not apply to {a_task}; "
                    f"use {' or '.join(fits)}"
                )
        if task == "text" and self.model.pretrained is None:
            raise ValueError(
                "a text run needs model.pretrained, the staged model directory "
                "(config.json, model.safetensors, tokenizer files); see docs/text.md"
            )
        return self


# sbatch options whose lines samat writes: additional_parameters may not replace them
RESERVED_SBATCH = {
    "array": "the grid's runs, throttled by slurm.array_parallelism",
    "a": "the grid's runs, throttled by slurm.array_parallelism",
    "signal": "the checkpoint signal, before the limit by slurm.signal_delay_s",
    "job_name": "samat-<grid name>",
    "j": "samat-<grid name>",
    "output": "the submitit folder of the output directory",
    "o": "the submitit folder of the output directory",
    "error": "the submitit folder of the output directory",
    "e": "the submitit folder of the output directory",
    "open_mode": "appended logs across requeues",
    "time": "slurm.timeout_min",
    "t": "slurm.timeout_min",
    "dependency": "arrays chained by samat",
    "d": "arrays chained by samat",
    "wrap": "the submitit command",
    "comment": "the journal intent that queued the array",
}


class SlurmConfig(Strict):
    partition: PlainText | None = None
    account: PlainText | None = None
    qos: PlainText | None = None
    gpus_per_node: int = Field(default=1, ge=0)
    cpus_per_task: int = Field(default=4, ge=1)
    mem_gb: float | None = Field(default=None, gt=0)
    timeout_min: int = Field(default=240, ge=1)
    # At most this many of the grid's tasks run at once, over all of its arrays together.
    array_parallelism: int = Field(default=64, ge=1)
    # Runs side by side in one array task, sharing its GPUs and splitting its CPUs (each its own
    # process, checkpoint, requeue and result): for runs too small to fill a GPU. SLURM only.
    runs_per_task: int = Field(default=1, ge=1)
    constraint: PlainText | None = None
    # Requeues allowed on time limit / preemption before a task counts as failed.
    max_num_timeout: int = Field(default=3, ge=0)
    # Seconds before the time limit at which SLURM signals the task to checkpoint and requeue.
    signal_delay_s: int = Field(default=90, ge=1)
    additional_parameters: dict[str, Any] = Field(default_factory=dict)
    setup: list[PlainText] = Field(default_factory=list)

    _plain_parameters = field_validator("additional_parameters")(_plain_mapping)

    @field_validator("additional_parameters")
    @classmethod
    def _not_samats_own(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            name = str(key).lstrip("-").replace("-", "_").lower()
            if name in RESERVED_SBATCH:
                raise ValueError(
                    f"{key!r} is a line samat writes itself ({RESERVED_SBATCH[name]}); "
                    "remove it from additional_parameters"
                )
        return value


class ContainerConfig(Strict):
    runtime: Literal["none", "apptainer", "docker", "pyxis"] = "none"
    image: PlainText | None = None
    # host:container pairs; the host side must exist when the grid is submitted.
    binds: list[PlainText] = Field(default_factory=list)
    # Passed through a file only the user can read (never on a command line).
    env: dict[str, str] = Field(default_factory=dict)
    # None = GPUs in the container when the grid asks SLURM for them (slurm.gpus_per_node > 0).
    gpu: bool | None = None
    # The runtime's executable (e.g. `podman` standing in for `docker`).
    executable: PlainText | None = None
    # pyxis: the image's python that runs submitit (None = /opt/venv/bin/python, the Dockerfile's).
    python: PlainText | None = None

    _plain_env = field_validator("env")(_plain_mapping)

    @field_validator("python")
    @classmethod
    def _python_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; name the image's python, e.g. /opt/venv/bin/python")
        return value

    @model_validator(mode="after")
    def _image_needed(self) -> ContainerConfig:
        if self.runtime != "none" and not self.image:
            raise ValueError(f"container.runtime {self.runtime!r} needs container.image")
        return self


class GridConfig(Strict):
    # SLURM's job name is samat-<name>
    name: Name
    output: PlainPath | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    # Cartesian product over dotted keys: {"model.name": ["small_cnn", "preact_resnet18"]}.
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    # Each variant is a set of dotted-key overrides; a list value sweeps within that variant only.
    variants: list[dict[str, Any]] = Field(default_factory=list)
    # Extra runs (dotted overrides of base) and filters (dotted key -> value or list of values).
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    # The most runs the grid may expand to, counted before any is built: a typo in a sweep
    # (or a hostile file) cannot make samat build millions of configs.
    max_runs: int = Field(default=10_000, ge=1)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    container: ContainerConfig = Field(default_factory=ContainerConfig)


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the first bad key by its dotted path, and what is wrong with it."""
    # In `AttackSpec | str` unions pydantic also reports the str branch; it only adds noise.
    errors = [e for e in error.errors() if "str" not in e["loc"]] or error.errors()
    first = errors[0]
    path = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
    kind = first["type"]
    got = first.get("input")
    if kind == "extra_forbidden":
        what = f"unknown key {path!r}; remove it or check its spelling"
    elif kind == "missing":
        what = f"missing key {path!r}; add it"
    elif kind == "union_tag_invalid":
        expected = first["ctx"]["expected_tags"]
        what = f"{path}.name: unknown name {first['ctx']['tag']!r}; choose one of {expected}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        shown = (
            ""
            if isinstance(got, dict | list) or got is None or repr(got) in message
            else (f" (got {got!r})")
        )
        what = f"{path or 'config'}: {message}{shown}"
    more = len(errors) - 1
    suffix = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {what}{suffix}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts union members (a tag such as 'sam', or a class name) into error locations
    return part in METHOD_NAMES or (
        isinstance(part, str) and (part[:1].isupper() or part.startswith(("function-", "list[")))
    )


def validate_method(data: dict[str, Any]) -> Any:
    """The method config of a stored run (a dict from config.yaml)."""
    return RunConfig.model_validate({"method": data}).method


def validate_run(data: dict[str, Any], source: str = "run config") -> RunConfig:
    """Build a RunConfig or raise ConfigError with a one-line message."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; check the path")
    try:
        data = safeyaml.load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; restore or rewrite the file") from None
    except safeyaml.YAMLLimitError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_grid(path: Path) -> GridConfig:
    """Read and validate a grid file."""
    data = read_yaml(path)
    try:
        grid = GridConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path))) from None
    if grid.output is None:
        grid.output = Path("results") / grid.name
    return grid


def load_run(path: Path) -> RunConfig:
    """Read and validate one run's config file."""
    return validate_run(read_yaml(path), str(path))
