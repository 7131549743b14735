"""The paper's whole experiment from one config: adapters, learned weights, the chrF++ table.

Stages, each skipping what an earlier run already finished (every output is written atomically,
training resumes from its checkpoint):

1. ``train_adapters``: ``in[X]`` on X->pivot and ``out[X]`` on pivot->X for every language X
   (the pivot's own pair on pivot->pivot), into ``out_dir/pool/{X}/{in|out}/``.
2. ``learn_weights``: per direction and strategy, the per-layer merge weights with both adapters
   frozen, into ``out_dir/weights/{strategy}/{src}-{tgt}/weights.json`` (+ ``weights.png``).
3. ``evaluate``: every Table 1 configuration over every direction of the evaluation split, into
   ``out_dir/eval/{configuration}.json`` (scores, signatures, hypotheses).
4. ``table``: ``out_dir/results.json`` and ``out_dir/table.md``.

Without ``model.path`` the base is a seeded random Qwen2 preset: the pipeline runs end to end, but
a random model cannot translate, so its scores are noise. The paper uses Qwen2.5-0.5B-Instruct.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import validate
from .adapters import AdapterController, LearnedWeights
from .console import Log, log_stderr, progress
from .data import DEFAULT_LANGS, PIVOT, adapter_jobs, directions, load_split
from .evaluate import (
    RATIOS,
    EvalConfig,
    evaluate_configuration,
    markdown_table,
    summarize,
    table1_configs,
    trainable_percent,
)
from .fileio import atomic_write_json, atomic_write_text, read_json
from .generation import SearchParams
from .kernels.reference import STRATEGIES
from .loading import load_pretrained, random_model
from .model import Qwen2ForCausalLM
from .pool import AdapterPool
from .tokenizer import Tokenizer
from .train import LoraConfig, TrainConfig, base_parameters, learn_weights, resolve_lora, train_adapter

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


@dataclass
class EvalSettings:
    num_beams: int = 5
    max_new_tokens: int = 256
    batch_size: int = 16
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    ratios: list[list[int]] = field(default_factory=lambda: [list(r) for r in RATIOS])
    learned: bool = True


def _default_weight_training() -> TrainConfig:
    # theta starts at (1, 1); the paper's adapter lr (2e-5) would barely move it in two epochs.
    return TrainConfig(lr=1e-2, warmup_ratio=0.0)


@dataclass
class PipelineConfig:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    weights: TrainConfig = field(default_factory=_default_weight_training)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> PipelineConfig:
        """Build from a nested dict (a parsed TOML), every key checked by :data:`modlora.validate.SETTINGS`;
        errors name ``where`` (the file) and the key."""
        raw = validate.check_settings(raw, where)
        default = cls()
        sections = {"model", "data", "lora", "train", "weights", "eval"}

        def build(name: str, values: dict):
            values = {k: tuple(v) if k == "target_modules" else v for k, v in values.items()}
            return dataclasses.replace(getattr(default, name), **values)

        parts = {name: build(name, raw.pop(name, {})) for name in sections}
        return dataclasses.replace(default, **raw, **parts)

    @classmethod
    def from_toml(cls, path: str | Path) -> PipelineConfig:
        import tomllib  # Python >= 3.11; the rest of modlora runs on 3.10

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
    "data": {"train_limit": 16, "weights_limit": 4, "eval_limit": 3},
    "train": {"epochs": 2, "lr": 1e-3, "batch_size": 8, "grad_accum": 1},
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


class Pipeline:
    """The experiment of one :class:`PipelineConfig`; each stage method skips finished work."""

    def __init__(self, config: PipelineConfig, log: Log = log_stderr) -> None:
        d = config.data
        if not isinstance(d.langs, list) or not all(isinstance(x, str) and x for x in d.langs):
            raise ValueError(f"data.langs must be a list of language codes, e.g. ['en', 'fr'], got {d.langs!r}")
        if d.pivot not in d.langs or len(set(d.langs)) < 2:
            raise ValueError(f"data.langs {d.langs} must hold the pivot language {d.pivot!r} and at least one other: "
                             f"adapters are trained on X->{d.pivot} and {d.pivot}->X")
        self.config = config
        self.out = Path(config.out_dir)
        self.log = log
        self._model = self._adapters = self._tokenizer = self._pool = None

    # -- shared resources, built on first use ------------------------------------------------

    @property
    def model(self) -> Qwen2ForCausalLM:
        if self._model is None:
            mc = self.config.model
            device = torch.device(mc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            default = torch.bfloat16 if device.type == "cuda" else torch.float32
            dtype = getattr(torch, mc.dtype) if mc.dtype else default
            if mc.path:
                self._model = load_pretrained(mc.path, dtype=dtype, device=device)
                self.log(f"base model: {mc.path} ({dtype}, {device})")
            else:
                self._model = random_model(mc.preset, seed=mc.seed, dtype=dtype, device=device)
                self.log(f"base model: random preset {mc.preset!r} (seed {mc.seed}, {dtype}, {device})")
        return self._model

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

    def train_adapters(self) -> None:
        """Stage 1: the 2n English-centric adapters."""
        cfg = self.config
        lora = resolve_lora(self.model, cfg.lora)
        data = None
        for job in adapter_jobs(cfg.data.langs, cfg.data.pivot):
            if (job.lang, job.side) in self.pool:
                self.log(f"{job}: done (in {self.pool.path(job.lang, job.side)})")
                continue
            data = data or self._split(cfg.data.train_split, cfg.data.train_limit)
            pairs = list(zip(data[job.src], data[job.tgt], strict=True))
            adapter = train_adapter(self.adapters, self.tokenizer, job.lang, job.side, job.src, job.tgt, pairs, lora,
                                    cfg.train, self.out / "train" / f"{job.lang}-{job.side}", log=self.log)
            self.pool.save(adapter)

    def weights_path(self, strategy: str, src: str, tgt: str) -> Path:
        return self.out / "weights" / strategy / f"{src}-{tgt}" / "weights.json"

    def learn_weights(self) -> None:
        """Stage 2: per-layer merge weights of every direction, for each evaluated strategy."""
        cfg = self.config
        if not cfg.eval.learned:
            return
        data = None
        for strategy in cfg.eval.strategies:
            for src, tgt in self.directions():
                path = self.weights_path(strategy, src, tgt)
                if path.is_file():
                    continue
                data = data or self._split(cfg.data.train_split, cfg.data.weights_limit or cfg.data.train_limit)
                pairs = list(zip(data[src], data[tgt], strict=True))
                learn_weights(self.adapters, self.tokenizer, self.pool.get(src, "in"), self.pool.get(tgt, "out"), src,
                              tgt, pairs, strategy, cfg.weights, path.parent, log=self.log)

    def configurations(self) -> list[EvalConfig]:
        e = self.config.eval
        return table1_configs(e.strategies, e.ratios, e.learned)

    def eval_path(self, config: EvalConfig) -> Path:
        return self.out / "eval" / f"{config.slug}.json"

    def eval_settings(self) -> dict:
        """What an evaluation file's scores depend on besides the adapters: kept in the file; evaluate
        redoes a file made with other settings, and table refuses files made with unlike settings."""
        d, e = self.config.data, self.config.eval
        return {"split": d.eval_split, "eval_limit": d.eval_limit, "langs": list(d.langs),
                "num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens}

    def _stored_settings(self, config: EvalConfig) -> dict | None:
        path = self.eval_path(config)
        return validate.eval_file(read_json(path), path)["settings"] if path.is_file() else None

    def evaluate(self) -> None:
        """Stage 3: translate the evaluation split in every direction under every configuration."""
        cfg = self.config
        data = None
        settings = self.eval_settings()
        todo = []
        for config in self.configurations():
            stored = self._stored_settings(config)
            if stored == settings:
                continue
            if stored is not None:
                self.log(f"eval {config.name}: {self.eval_path(config)} was made with {stored}; redoing it with "
                         f"{settings}")
            todo.append(config)
        for config in todo:
            data = data or self._split(cfg.data.eval_split, cfg.data.eval_limit)
            learned = None
            if config.learned:
                learned = {}
                for src, tgt in self.directions():
                    w = LearnedWeights.load(self.weights_path(config.strategy, src, tgt))
                    learned[(src, tgt)] = (w.w_in, w.w_out)
            n = sum(len(data[src]) for src, _ in self.directions())
            search = SearchParams(num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens)
            with progress(n, f"eval {config.name}") as bar:  # closed before an error is printed
                results = evaluate_configuration(
                    self.adapters, self.tokenizer, config, self.directions(), data, data, pool=self.pool,
                    learned=learned, search=search, batch_size=cfg.eval.batch_size, progress=bar.update)
            atomic_write_json(self.eval_path(config), {
                "config": dataclasses.asdict(config), "settings": settings,
                "directions": [{"src": s, "tgt": t, **r} for (s, t), r in results.items()]})

    def table(self) -> str:
        """Stage 4: gather the evaluation files into ``results.json`` and ``table.md``; returns the Markdown."""
        cfg = self.config
        langs = cfg.data.langs
        base = base_parameters(self.model)
        adapter_params = self.pool.get(langs[0], "in").num_parameters()
        rows, settings = [], None
        for config in self.configurations():
            path = self.eval_path(config)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the evaluate stage first")
            raw = validate.eval_file(read_json(path), path)
            settings = settings or raw.get("settings")
            if raw.get("settings") != settings:
                raise ValueError(f"{path} was made with {raw.get('settings')}, the other evaluations with {settings}: "
                                 "run the evaluate stage again")
            if settings is not None and settings.get("langs") != list(langs):
                raise ValueError(f"{path} covers the languages {settings.get('langs')}, not {list(langs)}: run the "
                                 "evaluate stage with these languages first")
            scores = {(d["src"], d["tgt"]): d["score"] for d in raw["directions"]}
            if set(scores) != set(self.directions()):
                raise ValueError(f"{path} does not hold the {len(self.directions())} directions of {list(langs)}: "
                                 "run the evaluate stage again")
            rows.append({"name": config.name, "trainable_percent": trainable_percent(
                config, adapter_params, base, self.model.config.num_hidden_layers),
                "signature": raw["directions"][0]["signature"], "summary": summarize(scores, langs)})
        md = markdown_table(rows, langs)
        if not cfg.model.path:
            md = f"> {RANDOM_BASE_NOTE}\n\n" + md
        try:
            atomic_write_json(self.out / "results.json", {"config": cfg.to_dict(), "eval_settings": settings,
                                                          "metric": "chrF++", "base_parameters": base,
                                                          "adapter_parameters": adapter_params, "rows": rows})
            atomic_write_text(self.out / "table.md", md)
        except OSError as e:  # a finished run kept read-only still prints its table
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self.log(f"warning: {self.out} is not writable ({e.strerror}): results.json and table.md not written")
        return md

    def run(self) -> str:
        """All stages; returns the Markdown table."""
        previous = self.out / "config.json"
        if previous.is_file() and read_json(previous) != json.loads(
                json.dumps(self.config.to_dict())):
            self.log(f"warning: {previous} differs from this config; finished stages are reused as they are "
                     "(delete them, or use another --out, to redo them)")
        atomic_write_json(previous, self.config.to_dict())
        self.train_adapters()
        self.learn_weights()
        self.evaluate()
        return self.table()
