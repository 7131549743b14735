"""The paper's whole experiment from one config: adapters, learned weights, the chrF++ table.

Stages, each skipping what an earlier run already finished (every output is written atomically,
training resumes from its checkpoint):

0. ``pretrain`` (only with ``data.pretrain_limit``, for a random base): plain language modelling of
   the whole base on the training split's first lines, each alone as plain text (never a
   translation pair), into ``out_dir/pretrain/model/``.
1. ``train_adapters``: ``in[X]`` on X->pivot and ``out[X]`` on pivot->X for every language X
   (the pivot's own pair on pivot->pivot), into ``out_dir/pool/{X}/{in|out}/``.
   ``train_full``: the full-parameter fine-tuning baseline on the union of that data, into
   ``out_dir/full/model/`` (a Hugging Face checkpoint folder).
2. ``learn_weights``: per direction and strategy, the per-layer merge weights with both adapters
   frozen, into ``out_dir/weights/{strategy}/{src}-{tgt}/weights.json``; then the paper's Figure 2
   per strategy, ``out_dir/weights/{strategy}/figure2.json`` (+ ``figure2.png``).
3. ``evaluate``: every Table 1 configuration over every direction of the evaluation split, into
   ``out_dir/eval/{configuration}.json`` (scores, signatures, hypotheses).
4. ``table``: ``out_dir/results.json`` and ``out_dir/table.md`` (and, against the paper's published
   numbers, ``out_dir/compare.md``).

Without ``model.path`` the base is a seeded random Qwen2 preset: the pipeline runs end to end, but
a random model cannot translate, so its scores are noise. The paper uses Qwen2.5-0.5B-Instruct.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed, validate
from .adapters import AdapterController, LearnedWeights
from .console import Log, log_stderr, progress
from .data import DEFAULT_LANGS, PIVOT, adapter_jobs, directions, load_split
from .evaluate import (
    RATIOS,
    EvalConfig,
    beats_both,
    evaluate_configuration,
    markdown_table,
    settings_line,
    summarize,
    table1_configs,
    trainable_percent,
)
from .figures import figure2_data, write_figure2
from .fileio import atomic_write_json, atomic_write_text, read_json
from .full import pretrain, train_full, union_directions
from .generation import SearchParams
from .hub import resolve_model_path
from .kernels.reference import STRATEGIES
from .loading import load_pretrained, random_model
from .model import Qwen2ForCausalLM
from .paper import compare_markdown, load_paper_table
from .pool import AdapterPool
from .prompt import language_name, register_language
from .tokenizer import Tokenizer
from .train import LoraConfig, TrainConfig, base_parameters, learn_weights, resolve_lora, train_adapter

RUN_RECORD = "modlora-run.json"
"""The settings a run folder was made with (not ``config.json``: ``--out`` may be a model's folder)."""
# Settings that shape no finished output as such: where it runs and the dtype asked for (the dtype
# they resolve to is recorded apart and binds, :meth:`Pipeline.record`), how often a checkpoint is
# written, activation checkpointing (bit-identical gradients), and what is evaluated (each
# evaluation file keeps the settings it was made with, and evaluate redoes one made with others).
FREE_SETTINGS = ("out_dir", "model.device", "model.dtype", "data.eval_split", "data.eval_limit", "eval.",
                 *(f"{stage}.{key}" for stage in ("pretrain", "train", "weights")
                   for key in ("checkpoint_every", "checkpoint_minutes", "activation_checkpointing")))

RANDOM_BASE_NOTE = ("NOTE: the base model has random weights (no --model DIR): it cannot translate, so these "
                    "scores are noise. Pass --model DIR with a Qwen2.5-0.5B-Instruct checkpoint (and the "
                    "full data) to reproduce the paper.")


@dataclass
class ModelConfig:
    path: str | None = None  # an HF checkpoint directory; None: the random ``preset``
    preset: str = "tiny"
    seed: int = 0
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda if available


@dataclass
class DataConfig:
    root: str | None = None  # FLORES-style folder; None: the vendored FLORES-101
    langs: list[str] = field(default_factory=lambda: list(DEFAULT_LANGS))
    pivot: str = PIVOT
    train_split: str = "dev"
    eval_split: str = "devtest"
    train_limit: int | None = None  # first N lines of each split (None: all)
    weights_limit: int | None = None  # lines used to learn merge weights (None: train_limit)
    eval_limit: int | None = None
    # First N lines of train_split per language on which a random base first learns plain language
    # modelling (stage ``pretrain``), each line alone, no prompt; None: no pre-training.
    pretrain_limit: int | None = None
    # English names the prompt uses for languages modlora does not know (code -> name, e.g. sw = "Swahili")
    language_names: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalSettings:
    num_beams: int = 5
    max_new_tokens: int = 256
    batch_size: int = 16
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    ratios: list[list[int]] = field(default_factory=lambda: [list(r) for r in RATIOS])
    learned: bool = True
    full: bool = True  # train and evaluate the full-parameter fine-tuning baseline


def _default_pretraining() -> TrainConfig:
    return TrainConfig(lr=1e-2, grad_accum=1)


def _default_weight_training() -> TrainConfig:
    # theta starts at (1, 1); the paper's adapter lr (2e-5) would barely move it in two epochs.
    return TrainConfig(lr=1e-2, warmup_ratio=0.0)


@dataclass
class PipelineConfig:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    pretrain: TrainConfig = field(default_factory=_default_pretraining)
    train: TrainConfig = field(default_factory=TrainConfig)
    weights: TrainConfig = field(default_factory=_default_weight_training)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> PipelineConfig:
        """Build from a nested dict (a parsed TOML), every key checked by :data:`modlora.validate.SETTINGS`;
        errors name ``where`` (the file) and the key."""
        raw = validate.check_settings(raw, where)
        default = cls()
        sections = {"model", "data", "lora", "pretrain", "train", "weights", "eval"}

        def build(name: str, values: dict):
            values = {k: tuple(v) if k == "target_modules" else v for k, v in values.items()}
            return dataclasses.replace(getattr(default, name), **values)

        parts = {name: build(name, raw.pop(name, {})) for name in sections}
        return dataclasses.replace(default, **raw, **parts)

    @classmethod
    def from_toml(cls, path: str | Path) -> PipelineConfig:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: tomllib's origin, a dependency there
            import tomli as tomllib

        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise validate.InputError(f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The two built-in setups, mirrored by configs/default.toml and configs/paper.toml (a test keeps them equal).
DEMO: dict = {
    "out_dir": "runs/default",
    "model": {"preset": "tiny", "seed": 0},
    "data": {"train_limit": 8, "weights_limit": 4, "eval_limit": 3, "pretrain_limit": 8},
    "pretrain": {"epochs": 20, "lr": 1e-2, "batch_size": 8, "grad_accum": 1},
    "train": {"epochs": 8, "lr": 1e-2, "batch_size": 4, "grad_accum": 1},
    "weights": {"epochs": 1, "lr": 1e-2, "batch_size": 4, "grad_accum": 1},
    "eval": {"num_beams": 5, "max_new_tokens": 12, "batch_size": 60},
}
PAPER: dict = {
    "out_dir": "runs/paper",
    "train": {"epochs": 2, "lr": 2e-5, "batch_size": 8, "grad_accum": 2},
    "weights": {"epochs": 2, "lr": 1e-2},
    "eval": {"num_beams": 5, "max_new_tokens": 256, "batch_size": 32},
}


def default_config(model_path: str | None = None) -> PipelineConfig:
    """The demo on the random tiny preset without a model; the paper's setup with one."""
    if model_path is None:
        return PipelineConfig.from_dict(DEMO)
    config = PipelineConfig.from_dict(PAPER)
    config.model.path = model_path
    return config


_OUTPUTS = ("pretrain", "train", "pool", "full", "weights", "eval")
# The outputs made with a setting: the merge weights' settings shape the weights (and what was
# evaluated with them), the adapters' training the trained outputs after pre-training, the list of
# languages only what mixes them (the pre-training's text, the full fine-tuning's data: an adapter
# or a direction's weights see their own languages only, so a language joins a run as the paper's
# modules do); every other setting (the model, the dtype, the data, the pre-training) all of them.
_MADE_WITH = ((("weights.", "data.weights_limit"), ("weights", "eval")),
              (("train.", "lora.", "data.train_limit", "data.pivot"), _OUTPUTS[1:]),
              (("data.langs",), ("pretrain", "full")),
              (("data_parallel_processes",), _OUTPUTS[:-1]))  # each step's batch: every training's


def _flat(settings: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _located(config: dict) -> dict:
    """``config`` with ``model.path`` and ``data.root`` as the folders they name here (absolute, links
    resolved, a hub id as its cached snapshot): ``./flores``, ``flores`` and a link to it are one
    setting, and a record read from another working directory still names the folder its outputs
    were made from. A path that names nothing here stays as written."""
    for section, key in (("model", "path"), ("data", "root")):
        settings = config.get(section)
        value = settings.get(key) if isinstance(settings, dict) else None
        if isinstance(value, str) and value:
            try:
                folder = resolve_model_path(value) if key == "path" else Path(value)
                settings[key] = str(folder.resolve(strict=True))
            except (OSError, RuntimeError, ValueError):  # missing, a link loop, a bad hub cache entry
                pass
    return config


def changed_settings(saved: dict, now: dict) -> dict[str, tuple[object, object]]:
    """The settings in which two run configs differ, but for :data:`FREE_SETTINGS`: ``{key: (old, new)}``."""
    before, after = _flat(saved), _flat(now)
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and not key.startswith(FREE_SETTINGS)}


class Pipeline:
    """The experiment of one :class:`PipelineConfig`; each stage method skips finished work."""

    def __init__(self, config: PipelineConfig, log: Log = log_stderr) -> None:
        d = config.data
        if not isinstance(d.langs, list) or not all(isinstance(x, str) and x for x in d.langs):
            raise ValueError(f"data.langs must be a list of language codes, e.g. ['en', 'fr'], got {d.langs!r}")
        if d.pivot not in d.langs or len(set(d.langs)) < 2:
            raise ValueError(f"data.langs {d.langs} must hold the pivot language {d.pivot!r} and at least one other: "
                             f"adapters are trained on X->{d.pivot} and {d.pivot}->X")
        if d.pretrain_limit and config.model.path:
            raise ValueError("data.pretrain_limit pre-trains a random base: it needs a preset base (no model.path)")
        for code, name in d.language_names.items():
            register_language(code, name)
        self.config = config
        self.out = Path(config.out_dir)
        self.log = log
        self._model = self._adapters = self._full = self._tokenizer = self._pool = None

    def start(self) -> None:
        """Before a stage works in the folder: its settings checked against the folder's record
        (:meth:`check_record`) and the data against every stage (:meth:`check_inputs`), then
        recorded (:meth:`write_record`), so a refused or failing command records nothing."""
        self.check_record()
        self.check_inputs()
        self.write_record()

    def record(self) -> dict:
        """What the folder's outputs are made with: the config, the dtype it resolves to here
        (``model.dtype`` unset: bf16 on CUDA, fp32 on CPU), and the processes a training step's batch
        is spread over (``--data-parallel`` on N processes trains on N times ``batch_size``)."""
        ctx = distributed.current()
        return {"config": _located(json.loads(json.dumps(self.config.to_dict()))), "dtype": self._dtype_name(),
                "data_parallel_processes": ctx.world_size if ctx.data_parallel else 1}

    def _dtype_name(self) -> str:
        return str(self._device_dtype()[1]).removeprefix("torch.")

    def check_record(self) -> None:
        """Refuse a run folder whose outputs, finished or begun, were made with other settings (named:
        adapters, weights and evaluations of two settings would mix, and the record would name only
        one)."""
        path = self.out / RUN_RECORD
        if not path.is_file():
            return
        saved, now = read_json(path), self.record()
        saved = saved if isinstance(saved, dict) else {}
        changes = changed_settings(_located(saved["config"]) if isinstance(saved.get("config"), dict) else {},
                                   now["config"])
        if saved.get("dtype") != now["dtype"]:
            changes["dtype"] = (saved.get("dtype"), now["dtype"])
        processes = saved.get("data_parallel_processes", now["data_parallel_processes"])  # an older record: any
        if processes != now["data_parallel_processes"]:
            changes["data_parallel_processes"] = (processes, now["data_parallel_processes"])
        changed = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items() if self._made_with(key)]
        if changed:
            raise validate.InputError(
                f"{self.out} was made with other settings ({'; '.join(changed)}): its adapters, weights and "
                f"evaluations would mix them. Rerun with those settings, use another --out, or delete "
                f"{self.out} to start over")

    def write_record(self) -> None:
        """Record this run's settings in its folder (rank 0), once every process has checked them."""
        ctx = distributed.current()
        ctx.barrier()  # no rank checks the folder after another has begun work in it
        if ctx.is_writer:
            atomic_write_json(self.out / RUN_RECORD, self.record())

    def _made_with(self, key: str) -> bool:
        """Whether outputs in the folder, finished or begun, depend on setting ``key``."""
        made = next((folders for prefixes, folders in _MADE_WITH if key.startswith(prefixes)), _OUTPUTS)
        return any((self.out / name).exists() for name in made)

    def check_inputs(self) -> None:
        """What the stages read from the data, checked before the first one trains (not hours into
        it): both splits of every language, their lines aligned, some, none of those used blank (a
        pair without a side) or holding a chat special token (it would end the prompt's turn), and a
        prompt name for every language."""
        d = self.config.data
        for split, limit in ((d.train_split, d.train_limit), (d.eval_split, d.eval_limit)):
            lines = load_split(split, d.langs, d.root, limit)
            where = f"the {split!r} split of {d.root or 'the vendored FLORES-101'}"
            if not lines[d.langs[0]]:
                raise validate.InputError(f"{where} has no lines")
            for lang, text in lines.items():
                blank = next((number for number, line in enumerate(text, 1) if not line), None)
                if blank is not None:
                    raise validate.InputError(f"{where}: {lang}.txt line {blank} is blank")
                validate.check_input_lines(text, f"{where}: {lang}.txt")
        for lang in d.langs:
            language_name(lang)

    # -- shared resources, built on first use ------------------------------------------------

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        mc = self.config.model
        device = torch.device(mc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default = torch.bfloat16 if device.type == "cuda" else torch.float32
        return device, getattr(torch, mc.dtype) if mc.dtype else default

    def _load_base(self, dtype: torch.dtype) -> Qwen2ForCausalLM:
        mc = self.config.model
        device, _ = self._device_dtype()
        if self.config.data.pretrain_limit:
            if not (self.pretrain_dir() / "config.json").is_file():
                raise FileNotFoundError(f"{self.pretrain_dir()} is missing: run the pretrain stage first")
            model = load_pretrained(self.pretrain_dir(), dtype=dtype, device=device)
            self.log(f"base model: preset {mc.preset!r} pre-trained in {self.pretrain_dir()} ({dtype}, {device})")
        elif mc.path:
            model = load_pretrained(mc.path, dtype=dtype, device=device)
            self.log(f"base model: {mc.path} ({dtype}, {device})")
        else:
            model = random_model(mc.preset, seed=mc.seed, dtype=dtype, device=device)
            self.log(f"base model: random preset {mc.preset!r} (seed {mc.seed}, {dtype}, {device})")
        return model

    @property
    def model(self) -> Qwen2ForCausalLM:
        if self._model is None:
            self._model = self._load_base(self._device_dtype()[1])
        return self._model

    def pretrain_dir(self) -> Path:
        return self.out / "pretrain" / "model"

    def full_model_dir(self) -> Path:
        return self.out / "full" / "model"

    @property
    def full_adapters(self) -> AdapterController:
        """The controller of the fully fine-tuned model (stage ``train_full``, in the evaluation dtype):
        it translates the "full" configuration, with no adapters bound."""
        if self._full is None:
            if not (self.full_model_dir() / "config.json").is_file():
                raise FileNotFoundError(f"{self.full_model_dir()} is missing: run the train-full stage first")
            device, dtype = self._device_dtype()
            self._full = AdapterController(load_pretrained(self.full_model_dir(), dtype=dtype, device=device))
        return self._full

    @property
    def adapters(self) -> AdapterController:
        """The model's adapter controller (one per model)."""
        if self._adapters is None:
            self._adapters = AdapterController(self.model)
        return self._adapters

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.for_model(self.config.model.path)
        return self._tokenizer

    @property
    def pool(self) -> AdapterPool:
        if self._pool is None:
            self._pool = AdapterPool(self.out / "pool")
        return self._pool

    def _split(self, split: str, limit: int | None) -> dict[str, list[str]]:
        d = self.config.data
        return load_split(split, d.langs, d.root, limit)

    def directions(self) -> list[tuple[str, str]]:
        return directions(self.config.data.langs)

    # -- stages -------------------------------------------------------------------------------

    def job_counts(self) -> dict[str, tuple[int, bool]]:
        """Independent jobs of each stage (the units torchrun's ranks share), and whether it trains."""
        cfg, n = self.config, len(self.directions())
        counts = {"train-adapters": (2 * len(cfg.data.langs), True),
                  "evaluate": (len(self.configurations()) * n, False)}
        if cfg.eval.learned:
            counts["learn-weights"] = (len(cfg.eval.strategies) * n, True)
        if cfg.eval.full:
            counts["train-full"] = (1, True)
        return counts

    def pretrain(self) -> None:
        """Stage 0 (a random base with ``data.pretrain_limit`` only): plain language modelling of the
        whole base on the training split's first lines as plain text, so that its tied output layer
        knows their tokens (a stand-in for an LLM that has read these languages); every later stage
        starts from the saved result."""
        cfg, ctx = self.config, distributed.current()
        d, save_dir = cfg.data, self.pretrain_dir()
        if not d.pretrain_limit:
            return
        if (save_dir / "config.json").is_file():  # written last
            self.log(f"pre-training: done (in {save_dir})")
        elif ctx.data_parallel or ctx.rank == 0:
            mono = load_split(d.train_split, d.langs, d.root, slice(d.pretrain_limit))
            mc = cfg.model
            model = random_model(mc.preset, seed=mc.seed, dtype=torch.float32, device=self._device_dtype()[0])
            pretrain(model, self.tokenizer, [text for lang in d.langs for text in mono[lang]], cfg.pretrain,
                     self.out / "train" / "pretrain", save_dir, log=self.log)
        ctx.barrier()

    def train_adapters(self) -> None:
        """Stage 1: the 2n English-centric adapters."""
        cfg, ctx = self.config, distributed.current()
        lora = resolve_lora(self.model, cfg.lora)
        data = None
        for job in ctx.training_jobs(adapter_jobs(cfg.data.langs, cfg.data.pivot)):
            if (job.lang, job.side) in self.pool:
                self.log(f"{job}: done (in {self.pool.path(job.lang, job.side)})")
                continue
            data = data or self._split(cfg.data.train_split, cfg.data.train_limit)
            pairs = list(zip(data[job.src], data[job.tgt], strict=True))
            adapter = train_adapter(self.adapters, self.tokenizer, job.lang, job.side, job.src, job.tgt, pairs, lora,
                                    cfg.train, self.out / "train" / f"{job.lang}-{job.side}", log=self.log)
            if ctx.writes_job_files:
                self.pool.save(adapter)
        ctx.barrier()

    def train_full(self) -> None:
        """Stage 1b: the full-parameter fine-tuning baseline (fp32 master weights), on the union of the
        adapters' English-centric data, with the adapters' training settings."""
        cfg, ctx = self.config, distributed.current()
        save_dir = self.full_model_dir()
        if not cfg.eval.full:
            return
        owner = 2 * len(cfg.data.langs) % ctx.world_size  # one more job of stage 1, after the adapters
        if (save_dir / "config.json").is_file():  # written last
            self.log(f"full fine-tuning: done (in {save_dir})")
        elif ctx.data_parallel or ctx.rank == owner:
            self._train_full(save_dir)
        ctx.barrier()

    def _train_full(self, save_dir: Path) -> None:
        cfg = self.config
        data = self._split(cfg.data.train_split, cfg.data.train_limit)
        union = union_directions([(job.src, job.tgt) for job in adapter_jobs(cfg.data.langs, cfg.data.pivot)])
        train_full(self._load_base(torch.float32), self.tokenizer,
                   {(s, t): list(zip(data[s], data[t], strict=True)) for s, t in union},
                   cfg.train, self.out / "train" / "full", save_dir, log=self.log)

    def weights_path(self, strategy: str, src: str, tgt: str) -> Path:
        return self.out / "weights" / strategy / f"{src}-{tgt}" / "weights.json"

    def learn_weights(self) -> None:
        """Stage 2: per-layer merge weights of every direction, for each evaluated strategy."""
        cfg, ctx = self.config, distributed.current()
        if not cfg.eval.learned:
            return
        data = None
        jobs = [(strategy, src, tgt) for strategy in cfg.eval.strategies for src, tgt in self.directions()]
        learned = 0
        for strategy, src, tgt in ctx.training_jobs(jobs):
            path = self.weights_path(strategy, src, tgt)
            if path.is_file():
                continue
            learned += 1
            data = data or self._split(cfg.data.train_split, cfg.data.weights_limit or cfg.data.train_limit)
            pairs = list(zip(data[src], data[tgt], strict=True))
            learn_weights(self.adapters, self.tokenizer, self.pool.get(src, "in"), self.pool.get(tgt, "out"), src,
                          tgt, pairs, strategy, cfg.weights, path.parent, log=self.log)
        learned = ctx.all_sum([learned])[0]  # also the stage's barrier: every rank's weights are written
        if ctx.is_writer:
            for strategy in cfg.eval.strategies:
                if learned or not (self.out / "weights" / strategy / "figure2.json").is_file():
                    self.figure2(strategy)

    def figure2(self, strategy: str) -> dict:
        """The paper's Figure 2 for one strategy from the learned weights: JSON and PNG beside them."""
        weights = {(src, tgt): LearnedWeights.load(self.weights_path(strategy, src, tgt)).pairs()
                   for src, tgt in self.directions()}
        data = figure2_data(weights, self.directions(), strategy)
        folder = self.out / "weights" / strategy
        if not write_figure2(data, folder / "figure2.json", folder / "figure2.png"):
            self.log(f"matplotlib is not installed: {folder / 'figure2.json'} written, no PNG")
        return data

    def configurations(self) -> list[EvalConfig]:
        e = self.config.eval
        return table1_configs(e.strategies, e.ratios, e.learned, e.full)

    def eval_path(self, config: EvalConfig) -> Path:
        return self.out / "eval" / f"{config.slug}.json"

    def eval_settings(self) -> dict:
        """What an evaluation file's scores depend on besides the adapters: kept in the file; evaluate
        redoes a file made with other settings, and table refuses files made with unlike settings."""
        d, e = self.config.data, self.config.eval
        return {"split": d.eval_split, "eval_limit": d.eval_limit, "langs": list(d.langs),
                "num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens, "dtype": self._dtype_name()}

    def cell_path(self, config: EvalConfig, src: str, tgt: str) -> Path:
        return self.out / "eval" / "cells" / config.slug / f"{src}-{tgt}.json"

    def _stored(self, path: Path, check: Callable[[object, Path], dict]) -> tuple[dict, list[tuple[str, str]]] | None:
        """The settings a stored evaluation (``check``: ``validate.eval_file``) or cell file
        (``validate.eval_cell``) was made with, and the directions it holds (sorted); None when there
        is none, or a damaged one (said). A file is reused only where both are the run's."""
        if not path.is_file():
            return None
        try:
            raw = check(read_json(path), path)
        except ValueError as e:
            self.log(f"warning: {path} is damaged ({e}); it is redone")
            return None
        return raw["settings"], sorted((d["src"], d["tgt"]) for d in raw.get("directions", [raw]))

    def evaluate(self) -> None:
        """Stage 3: translate the evaluation split in every direction under every configuration.

        The jobs are cells, one configuration in one direction, each written to its own file (by
        the rank that owns it); rank 0 then gathers each configuration's cells into one file.
        """
        cfg, ctx = self.config, distributed.current()
        settings = self.eval_settings()
        todo = []
        for config in self.configurations():
            stored = self._stored(self.eval_path(config), validate.eval_file)
            if stored == (settings, sorted(self.directions())):
                continue
            if stored is not None and ctx.is_writer:
                self.log(f"eval {config.name}: {self.eval_path(config)} holds {len(stored[1])} direction(s) made "
                         f"with {stored[0]}; redoing its {len(self.directions())} with {settings}")
            todo.append(config)
        cells = [(config, src, tgt) for config in todo for src, tgt in self.directions()]
        mine = [c for c in ctx.shard(cells)
                if self._stored(self.cell_path(*c), validate.eval_cell) != (settings, [c[1:]])]
        if mine:
            data = self._split(cfg.data.eval_split, cfg.data.eval_limit)
            search = SearchParams(num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens)
            total = sum(len(data[src]) for _, src, _ in mine)
            with progress(total, f"eval ({len(mine)} cells)") as bar:  # closed before an error is printed
                for config, src, tgt in mine:
                    learned = None
                    if config.learned:
                        w = LearnedWeights.load(self.weights_path(config.strategy, src, tgt), src, tgt,
                                                config.strategy, self.model.config.num_hidden_layers)
                        learned = {(src, tgt): (w.w_in, w.w_out)}
                    result = evaluate_configuration(
                        self.full_adapters if config.full else self.adapters, self.tokenizer, config, [(src, tgt)],
                        data, data, pool=self.pool, learned=learned, search=search, batch_size=cfg.eval.batch_size,
                        progress=bar.update)[(src, tgt)]
                    atomic_write_json(self.cell_path(config, src, tgt), {
                        "config": dataclasses.asdict(config), "settings": settings, "src": src, "tgt": tgt, **result})
        ctx.barrier()
        if ctx.is_writer:
            for config in todo:
                atomic_write_json(self.eval_path(config), {
                    "config": dataclasses.asdict(config), "settings": settings,
                    "directions": [self._cell(config, src, tgt, settings) for src, tgt in self.directions()]})

    def _cell(self, config: EvalConfig, src: str, tgt: str, settings: dict) -> dict:
        path = self.cell_path(config, src, tgt)
        raw = validate.eval_cell(read_json(path), path)
        if raw["settings"] != settings or (raw["src"], raw["tgt"]) != (src, tgt):
            raise ValueError(f"{path} was made with {raw['settings']} for {raw['src']}->{raw['tgt']}, not {settings} "
                             f"for {src}->{tgt}: run the evaluate stage again")
        return {k: raw[k] for k in ("src", "tgt", "score", "signature", "hypotheses")}

    def table(self, compare_paper: str | Path | None = None) -> str:
        """Stage 4: gather the evaluation files into ``results.json`` and ``table.md``; returns the Markdown.
        With ``compare_paper`` (a paper table file, :mod:`modlora.paper`) it also writes ``compare.md``,
        our scores beside the paper's, and appends it to what it returns."""
        cfg = self.config
        langs = cfg.data.langs
        base = base_parameters(self.model)
        adapter_params = self.pool.get(langs[0], "in").num_parameters()
        rows, settings = [], self.eval_settings()
        for config in self.configurations():
            path = self.eval_path(config)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the evaluate stage first")
            raw = validate.eval_file(read_json(path), path)
            if raw.get("settings") != settings:  # a table states the settings it was asked for
                raise validate.InputError(f"{path} was made with {raw.get('settings')}, not this run's {settings}: "
                                          "run the evaluate stage again")
            scores = {(d["src"], d["tgt"]): d["score"] for d in raw["directions"]}
            if set(scores) != set(self.directions()):
                raise ValueError(f"{path} does not hold the {len(self.directions())} directions of {list(langs)}: "
                                 "run the evaluate stage again")
            rows.append({"name": config.name, "label": config.label, "merged": config.merged,
                         "trainable_percent": trainable_percent(
                config, adapter_params, base, self.model.config.num_hidden_layers),
                "signature": raw["directions"][0]["signature"], "summary": summarize(scores, langs)})
        single = {r["name"]: r["summary"] for r in rows if r["name"] in ("in only", "out only")}
        for row in rows:
            if row["merged"] and len(single) == 2:
                row["marks"] = beats_both(row["summary"], single["in only"], single["out only"])
        md = f"{settings_line(settings)}\n\n{markdown_table(rows, langs)}"
        if not cfg.model.path:
            md = f"> {RANDOM_BASE_NOTE}\n\n" + md
        compared = None if compare_paper is None else compare_markdown(rows, langs, load_paper_table(compare_paper))
        try:
            atomic_write_json(self.out / "results.json", {"config": cfg.to_dict(), "eval_settings": settings,
                                                          "metric": "chrF++", "base_parameters": base,
                                                          "adapter_parameters": adapter_params, "rows": rows})
            atomic_write_text(self.out / "table.md", md)
            if compared is not None:
                atomic_write_text(self.out / "compare.md", compared)
        except OSError as e:  # a finished run kept read-only still prints its table
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self.log(f"warning: {self.out} is not writable ({e.strerror}): results.json and table.md not written")
        if compared is not None:
            md += "\n" + compared
        return md

    def run(self) -> str:
        """All stages; returns the Markdown table (rank 0 of several processes writes it, the others return "").

        Raises:
            InputError: the folder's finished outputs were made with other settings, or the data
                cannot serve every stage (:meth:`start`).
        """
        self.start()
        self.pretrain()
        self.train_adapters()
        self.train_full()
        self.learn_weights()
        self.evaluate()
        return self.table() if distributed.current().is_writer else ""
