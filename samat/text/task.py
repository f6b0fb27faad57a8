"""The text task behind samat's run loop: DistilBERT on Rotten Tomatoes, attacked by PSO and IGA.

- `build`: the staged data (`data.root`), tokenizer and model (`model.pretrained`); with
  `data.generate`, a tiny look-alike of each staged file that is absent is written first (see
  `generate_staged`).
- `loader`: a TokenLoader over the tokenized training split.
- `evaluate`: clean accuracy on the whole test split and on the attacked examples, then each word
  attack over those examples, one example at a time, each finished example stored at once (a
  killed or requeued task resumes at the next unattacked one).
- `summary`: natural accuracy and, per attack, its success rate (what the papers' table shows).

Attack options (`eval.attacks[*].options`), defaults the published recipes':
- pso: `hownet` (the HowNet candidates file; default `<data.root>/hownet-candidates.json`),
  `pop_size` 60, `max_iters` 20.
- iga: `embeddings` (the counter-fitted vectors; default `<data.root>/counter-fitted-vectors.txt`),
  `pop_size` 60, `max_iters` 20, `max_candidates` 50, `max_distance` 0.5 (squared), `max_rate`
  0.2 (share of the words that may change), `max_replacements` 5.
A path option names the file or a folder holding it; relative paths are taken from the working
directory, as `data.root` is.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samat import attacks
from samat.config import AttackSpec, ConfigError, RunConfig
from samat.evaluate import store_clean
from samat.store import RunDir, images_key, record_keys
from samat.text.attack import AttackResult, example_seed, summarize
from samat.text.data import (
    RT_FILES,
    RT_FOLDER,
    SPLITS,
    TextDataset,
    TextSplit,
    TokenizedSplit,
    TokenLoader,
    generate_rotten_tomatoes,
    load_rotten_tomatoes,
    tiny_vocabulary,
    tokenize_split,
)
from samat.text.iga import IGA, IGAConfig
from samat.text.model import (
    TextVictim,
    load_pretrained,
    load_tokenizer,
    require_model_dir,
    write_tiny_model,
)
from samat.text.pso import PSO, PSOConfig
from samat.text.resources import (
    COUNTERFITTED_FILE,
    HOWNET_FILE,
    EmbeddingSynonyms,
    SememeSynonyms,
    load_counterfitted,
    load_hownet_candidates,
    write_tiny_resources,
)

log = logging.getLogger("samat.text")

MODELS = ("distilbert",)
# The draw that data.train_size / data.test_size keep (the image data sets' seed).
SUBSET_SEED = 0
# attack -> (the option naming its staged resource, the file's name and default under data.root)
RESOURCES = {"pso": ("hownet", HOWNET_FILE), "iga": ("embeddings", COUNTERFITTED_FILE)}


@dataclass(frozen=True, eq=False)
class TextRunData:
    """What `build` gives the run loop: tokenized splits plus what the attacks need (the
    tokenizer and the sentences, cut as the tokenized splits are)."""

    train: TokenizedSplit
    test: TokenizedSplit
    sentences: TextDataset
    tokenizer: Any
    max_length: int
    validation: None = None
    num_classes: int = 2


# -- generation -----------------------------------------------------------------------------------


def _has_data(root: Path) -> bool:
    """Whether `root` holds a layout load_rotten_tomatoes reads (it checks the files)."""
    for folder in (root, root / RT_FOLDER):
        if any((folder / name).is_file() for name in RT_FILES.values()):
            return True
    return any(
        (base / f"{split}.{ext}").is_file() or any(base.glob(f"{split}-*.{ext}"))
        for base in (root, root / "data")
        for split in SPLITS
        for ext in ("csv", "jsonl", "parquet")
    )


def _publish(target: Path, make: Callable[[Path], Path]) -> bool:
    """Build `target` atomically: `make(scratch)` writes into a fresh folder beside it and
    returns what to rename to `target`. A target that another run created first is kept (the
    content is the same: generation is deterministic); returns whether this call placed it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = _scratch_folder(target)
    try:
        product = make(scratch)
        try:
            os.rename(product, target)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
            return False
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_folder(target: Path) -> Path:
    """A new folder `.name.XXXXXXXXXXXX.tmp` beside target, made as any folder the user makes
    (0777 less the umask: mkdtemp's 0700 would hide the generated files from the group)."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{os.urandom(6).hex()}.tmp"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp folder name beside {target}")


def _resource_file(path: Path, name: str) -> Path:
    """The file a resource option names: the path, or `name` inside it when it is a folder."""
    return path / name if path.is_dir() else path


def _absent(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def generate_staged(config: RunConfig) -> list[Path]:
    """With `data.generate`, write a tiny look-alike of each staged file that is absent, and
    return what this call wrote:

    - `data.root/rt-polaritydata/` (the release's .pos/.neg files, n_examples sentences per
      polarity), unless data.root holds any accepted layout;
    - the tiny random DistilBERT directory at `model.pretrained`, unless it exists (an empty
      folder counts as absent; an incomplete one is an error when it is loaded);
    - each requested attack's resource file (the path its option names, or its default under
      data.root): the counter-fitted vectors and the HowNet candidates, of the same clusters.

    Everything follows from generate.seed alone (the model's position table holds
    max(128, data.max_length) positions). Each piece is written in a temporary folder beside its
    target and renamed into place, so a run starting beside this one finds it whole or absent."""
    generate = config.data.generate
    if generate is None:
        return []
    assert config.data.root is not None and config.model.pretrained is not None
    root, model_dir = Path(config.data.root), Path(config.model.pretrained)
    seed = generate.seed
    written = []

    def data(scratch: Path) -> Path:
        return generate_rotten_tomatoes(scratch, n=generate.n_examples, seed=seed) / RT_FOLDER

    def model(scratch: Path) -> Path:
        length = max(128, config.data.max_length)
        return write_tiny_model(
            scratch / "model", tiny_vocabulary(), seed, max_position_embeddings=length
        )

    if not _has_data(root) and _publish(root / RT_FOLDER, data):
        written.append(root / RT_FOLDER)
    if _absent(model_dir) and _publish(model_dir, model):
        written.append(model_dir)
    for spec in attacks.resolve(config.eval.attacks):
        if spec.attack not in RESOURCES:
            continue
        option, name = RESOURCES[spec.attack]
        target = _resource_file(_resource_path(spec, option, name, root), name)
        if target.exists():
            continue

        def resource(scratch: Path, name: str = name) -> Path:
            return write_tiny_resources(scratch, tiny_vocabulary(), seed=seed) / name

        if _publish(target, resource):
            written.append(target)
    return written


# -- attack settings ------------------------------------------------------------------------------


def _resource_path(spec: AttackSpec, option: str, name: str, root: Path | None) -> Path:
    value = spec.options.get(option)
    if value is None:
        if root is None:
            raise ConfigError(f"attack {attacks.label(spec)!r}: set options.{option}")
        return Path(root) / name
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"attack {attacks.label(spec)!r}: options.{option} must be a path, got {value!r}"
        )
    return Path(value)


def _number(spec: AttackSpec, option: str, default: Any, check: Callable[[Any], bool]) -> Any:
    value = spec.options.get(option, default)
    kind = type(default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
        or not check(value)
    ):
        raise ConfigError(
            f"attack {attacks.label(spec)!r}: options.{option} {value!r} is not a valid "
            f"{'integer' if kind is int else 'number'} (default {default!r})"
        )
    return kind(value)


@dataclass(frozen=True)
class AttackPlan:
    """One text attack, its options read: which resource it loads and its search settings."""

    spec: AttackSpec
    option: str  # the resource's option name: hownet or embeddings
    path: Path  # the resource as named (file or folder)
    settings: PSOConfig | IGAConfig
    max_candidates: int = 50
    max_distance: float = 0.5

    @property
    def label(self) -> str:
        return attacks.label(self.spec)

    def check_resource(self) -> None:
        """One-line ConfigError naming the option and the path when the resource is absent."""
        name = RESOURCES[self.spec.attack][1]
        if not _resource_file(self.path, name).is_file():
            given = "options." + self.option
            if self.option not in self.spec.options:
                given += " (unset: its default under data.root)"
            raise ConfigError(
                f"attack {self.label!r}: {given} {self.path}: no {name} there; stage it "
                "(docs/text.md) or fix the path"
            )


def attack_plan(spec: AttackSpec, root: Path | None) -> AttackPlan:
    """Read a pso or iga spec's options (ConfigError for a bad value or another attack)."""
    positive = lambda v: v >= 1  # noqa: E731
    if spec.attack == "pso":
        settings: PSOConfig | IGAConfig = PSOConfig(
            pop_size=_number(spec, "pop_size", 60, positive),
            max_iters=_number(spec, "max_iters", 20, positive),
        )
        return AttackPlan(
            spec, "hownet", _resource_path(spec, "hownet", HOWNET_FILE, root), settings
        )
    if spec.attack == "iga":
        settings = IGAConfig(
            pop_size=_number(spec, "pop_size", 60, positive),
            max_iters=_number(spec, "max_iters", 20, positive),
            max_replacements=_number(spec, "max_replacements", 5, positive),
            max_perturb_ratio=_number(spec, "max_rate", 0.2, lambda v: 0 < v <= 1),
        )
        return AttackPlan(
            spec,
            "embeddings",
            _resource_path(spec, "embeddings", COUNTERFITTED_FILE, root),
            settings,
            max_candidates=_number(spec, "max_candidates", 50, positive),
            max_distance=_number(spec, "max_distance", 0.5, lambda v: v > 0),
        )
    raise ConfigError(
        f"attack {attacks.label(spec)!r}: {spec.attack} does not attack text; a text run's "
        "attacks are pso and iga"
    )


def attack_plans(config: RunConfig) -> list[AttackPlan]:
    return [attack_plan(spec, config.data.root) for spec in attacks.resolve(config.eval.attacks)]


# -- the task -------------------------------------------------------------------------------------


def _keep(split: TextSplit, size: int | None, key: str) -> TextSplit:
    """A fixed draw of `size` examples (seed SUBSET_SEED, as for the image data sets): the
    release lists every positive sentence before the negative ones, so a prefix is one class."""
    if size is None:
        return split
    if size > len(split):
        raise ConfigError(
            f"data.{key} {size} exceeds the {len(split)} examples of rotten_tomatoes; "
            f"lower data.{key}"
        )
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    keep = torch.randperm(len(split), generator=generator)[:size].tolist()
    return TextSplit(tuple(split.texts[i] for i in keep), tuple(split.labels[i] for i in keep))


def _clean_accuracy(
    model: torch.nn.Module, split: TokenizedSplit, batch_size: int
) -> tuple[int, int]:
    """(correct, total) of the model in eval mode; the mode is restored."""
    device = next(model.parameters()).device
    loader = TokenLoader(split, batch_size, device=device, shuffle=False)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for inputs, labels in loader.epoch(0):
                correct += (model(inputs).argmax(1) == labels).sum()
    finally:
        model.train(was_training)
    return int(correct), len(split.labels)


def _result_json(result: AttackResult, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "label": result.label,
        "status": result.status,
        "n_queries": result.n_queries,
        "original": list(result.original),
        "adversarial": list(result.adversarial),
    }


def _result(data: dict[str, Any]) -> AttackResult:
    return AttackResult(
        tuple(data["original"]),
        int(data["label"]),
        data["status"],
        tuple(data["adversarial"]),
        int(data["n_queries"]),
    )


class TextTask:
    """DistilBERT on Rotten Tomatoes (see the module doc)."""

    def build(self, config: RunConfig, device: Any) -> tuple[TextRunData, torch.nn.Module]:
        if config.model.name not in MODELS:
            raise ConfigError(
                f"model.name {config.model.name!r}: a text run's model is {' or '.join(MODELS)}"
            )
        if config.train.validation.size:
            raise ConfigError(
                "train.validation: text runs hold out no validation split; set its size to 0"
            )
        assert config.data.root is not None and config.model.pretrained is not None
        for path in generate_staged(config):
            log.info("generated %s", path)
        model_dir = require_model_dir(config.model.pretrained)
        plans = attack_plans(config)
        for plan in plans:
            plan.check_resource()
        raw = load_rotten_tomatoes(config.data.root)
        sentences = TextDataset(
            train=_keep(raw.train, config.data.train_size, "train_size"),
            validation=raw.validation,
            test=_keep(raw.test, config.data.test_size, "test_size"),
            source=raw.source,
        )
        tokenizer = load_tokenizer(model_dir)
        length = config.data.max_length
        dataset = TextRunData(
            train=tokenize_split(tokenizer, sentences.train, length),
            test=tokenize_split(tokenizer, sentences.test, length),
            sentences=sentences,
            tokenizer=tokenizer,
            max_length=length,
        )
        model = load_pretrained(model_dir, num_labels=2, seed=config.seed).to(device)
        return dataset, model

    def loader(self, config: RunConfig, dataset: TextRunData, device: Any) -> TokenLoader:
        return TokenLoader(
            dataset.train, config.train.batch_size, device=device, shuffle=True, seed=config.seed
        )

    def evaluate(
        self,
        run: RunDir,
        config: RunConfig,
        model: torch.nn.Module,
        dataset: TextRunData,
        *,
        checkpoint: str,
        stop: Any,
    ) -> dict[str, dict[str, Any]]:
        """The records of what `config.eval` asks for, by label, each stored as it finishes."""
        from samat.evaluate import subset_indices

        request = config.eval
        test = dataset.test
        index = subset_indices(len(test.labels), request.n_examples, request.subset_seed)
        keys = record_keys(config)
        images = images_key(config, checkpoint)
        records: dict[str, dict[str, Any]] = {}
        key = keys["natural"]
        records["natural"] = run.eval_record(key) or store_clean(
            run,
            key,
            "Natural",
            {"kind": "clean", "images": "all", "checkpoint": checkpoint},
            lambda: _clean_accuracy(model, test, request.batch_size),
        )
        subset = TokenizedSplit(test.inputs[index], test.labels[index])
        key = keys["natural_subset"]
        records["natural_subset"] = run.eval_record(key) or store_clean(
            run,
            key,
            "Natural (attacked examples)",
            {"kind": "clean", **images},
            lambda: _clean_accuracy(model, subset, request.batch_size),
        )
        all_examples = dataset.sentences.test.examples()
        examples = [(int(i), *all_examples[int(i)]) for i in index]
        victim = TextVictim(
            model, dataset.tokenizer, max_length=dataset.max_length, batch_size=request.batch_size
        )
        loaded: dict[tuple[str, Path], Any] = {}
        for plan in attack_plans(config):
            key = keys[plan.label]
            record = run.eval_record(key)
            if record is None:
                if stop is not None:
                    stop.check()
                plan.check_resource()
                attack = _make_attack(plan, loaded)
                fields = {"kind": "attack", "attack": attacks.canonical(plan.spec), **images}
                record = _attack(
                    run, key, plan.label, fields, attack, victim, examples, config, stop
                )
            records[plan.label] = {**record, "label": plan.label}
        return records

    def summary(self, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """result.json's numbers: natural accuracy and each attack's success rate (fractions)."""
        attacked = {
            label: r for label, r in records.items() if label not in ("natural", "natural_subset")
        }
        return {
            "metric": "accuracy",
            "natural": records["natural"]["accuracy"],
            "natural_subset": records["natural_subset"]["accuracy"],
            "robust": {label: r["success_rate"] for label, r in attacked.items()},
            "average_robust": None,
            "robust_examples": records["natural_subset"]["total"] if attacked else 0,
            "success_metric": "success_rate",
            "text_attacks": {
                label: {
                    "success_rate": r["success_rate"],
                    "queries": r["queries"],
                    "perturbed_rate": r["perturbed_rate"],
                    "robust_accuracy": r["accuracy"],
                }
                for label, r in attacked.items()
            },
        }


def _make_attack(plan: AttackPlan, loaded: dict[tuple[str, Path], Any]) -> PSO | IGA:
    """The attack with its candidates; each resource file is read once per evaluation."""
    if isinstance(plan.settings, PSOConfig):
        key = ("hownet", plan.path)
        if key not in loaded:
            loaded[key] = load_hownet_candidates(plan.path)
        return PSO(SememeSynonyms(loaded[key]), plan.settings)
    key = ("embeddings", plan.path)
    if key not in loaded:
        loaded[key] = load_counterfitted(plan.path)
    synonyms = EmbeddingSynonyms(loaded[key], plan.max_candidates, plan.max_distance)
    return IGA(synonyms, plan.settings)


def _attack(
    run: RunDir,
    key: str,
    label: str,
    fields: dict[str, Any],
    attack: PSO | IGA,
    victim: TextVictim,
    examples: list[tuple[int, list[str], int]],
    config: RunConfig,
    stop: Any,
) -> dict[str, Any]:
    """One attack over the examples (test index, tokens, label), each seeded by its test index
    (example_seed(seed, index)); every finished example is stored at once."""
    progress = run.eval_progress(key)
    done: list[dict[str, Any]] = progress.get("results", []) if progress.get("key") == key else []
    if [r.get("index") for r in done] != [e[0] for e in examples[: len(done)]]:
        done = []  # progress over other examples: start again
    seconds = float(progress.get("seconds", 0.0)) if done else 0.0
    if done:
        log.info("attack %s: resuming at %d of %d examples", label, len(done), len(examples))
    for position in range(len(done), len(examples)):
        index, tokens, target = examples[position]
        began = time.perf_counter()
        result = attack(tokens, target, victim, seed=example_seed(config.seed, index))
        done.append(_result_json(result, index))
        seconds += time.perf_counter() - began
        run.save_eval_progress(key, {"key": key, "results": done, "seconds": seconds})
        log.info("attack %s: %d/%d %s", label, position + 1, len(examples), result.status)
        if stop is not None and position + 1 < len(examples):
            stop.check()
    summary = summarize([_result(r) for r in done])
    n = summary.n_examples
    record = {
        "key": key,
        "label": label,
        **fields,
        "correct": summary.n_failed,
        "total": n,
        "accuracy": summary.n_failed / n if n else 0.0,
        "clean_accuracy": (summary.n_succeeded + summary.n_failed) / n if n else 0.0,
        "success_rate": summary.success_rate / 100,
        "queries": summary.mean_queries,
        "perturbed_rate": summary.mean_perturbed_rate,
        "succeeded": summary.n_succeeded,
        "failed": summary.n_failed,
        "skipped": summary.n_skipped,
        "examples": done,
        "seconds": seconds,
        "finished": time.time(),
    }
    run.write_eval_record(record)
    log.info("attack success rate %s: %.4f", label, record["success_rate"])
    return record


TASK = TextTask()
