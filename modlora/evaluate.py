"""chrF++ of every direction and configuration, and the paper's Table 1 layout (docs/design.md, "Evaluation").

A configuration says which adapters translate ``src -> tgt``: none (the base model), ``in[src]``
alone, ``out[tgt]`` alone, or the pair merged by strategy ``output`` or ``ab`` at fixed weights or
at the per-layer weights learned for that direction. Scores are corpus-level chrF++
(``CHRF(word_order=2)``; plain ``CHRF()`` would be chrF) and every score keeps its signature.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sacrebleu.metrics import CHRF
from torch import Tensor

from .adapters import AdapterController
from .generation import SearchParams, translate
from .kernels.reference import STRATEGIES
from .pool import AdapterPool
from .tokenizer import Tokenizer

RATIOS = ((1, 9), (3, 7), (7, 3), (9, 1))


def chrf_pp(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus chrF++ and its sacrebleu signature."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("chrF++ of no sentences is undefined: give at least one hypothesis and reference")
    metric = CHRF(word_order=2)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"score": score.score, "signature": str(metric.get_signature())}


@dataclass(frozen=True)
class EvalConfig:
    """One row of Table 1: which model translates (the base, or the fully fine-tuned one with
    ``full``), which adapters are active, merged how, with which weights."""

    name: str
    use_in: bool = False
    use_out: bool = False
    strategy: str = "output"
    w_in: float = 1.0
    w_out: float = 1.0
    learned: bool = False
    full: bool = False

    @property
    def slug(self) -> str:
        """File-system name of the configuration ("output 3:7" -> "output-3-7")."""
        return self.name.replace(" ", "-").replace(":", "-")

    @property
    def label(self) -> str:
        """The row's name in the paper's Table 1 ("output 3:7" -> "Setting 1 (3:7)")."""
        if self.merged:
            return f"{SETTING[self.strategy]} ({self.name.split(' ', 1)[1]})"
        return LABELS[self.name]

    @property
    def merged(self) -> bool:
        return self.num_adapters() == 2

    def num_adapters(self) -> int:
        return int(self.use_in) + int(self.use_out)


LABELS = {"base": "Pre-train", "full": "Full-parameter fine-tuning", "in only": "LoRA_in", "out only": "LoRA_out"}
SETTING = {"output": "Setting 1", "ab": "Setting 2"}  # eq. 3 (merge the outputs), eq. 4 (merge A and B)


def table1_configs(strategies: Sequence[str] = STRATEGIES, ratios: Sequence[Sequence[int]] = RATIOS,
                   learned: bool = True, full: bool = True) -> list[EvalConfig]:
    """Table 1's rows in the paper's order: Pre-train, Full-parameter fine-tuning, LoRA_in, LoRA_out,
    the fixed ratios of Setting 1 then Setting 2; then our learned-weight rows, one per strategy."""
    configs = [EvalConfig("base")] + ([EvalConfig("full", full=True)] if full else [])
    configs += [EvalConfig("in only", use_in=True), EvalConfig("out only", use_out=True)]
    for strategy in strategies:
        for a, b in ratios:
            configs.append(EvalConfig(f"{strategy} {a}:{b}", True, True, strategy, a / (a + b), b / (a + b)))
    if learned:
        configs += [EvalConfig(f"{strategy} learned", True, True, strategy, learned=True) for strategy in strategies]
    return configs


def summarize(scores: Mapping[tuple[str, str], float], langs: Sequence[str]) -> dict:
    """The direction matrix (rows: source, columns: target, diagonal None), the per-source
    ``x->`` and per-target ``->x`` averages, and the average over all directions."""
    matrix = [[None if s == t else scores[(s, t)] for t in langs] for s in langs]
    from_avg = {s: statistics.fmean(scores[(s, t)] for t in langs if t != s) for s in langs}
    to_avg = {t: statistics.fmean(scores[(s, t)] for s in langs if s != t) for t in langs}
    return {"langs": list(langs), "matrix": matrix, "from": from_avg, "to": to_avg,
            "avg": statistics.fmean(scores[(s, t)] for s in langs for t in langs if s != t)}


def beats_both(summary: dict, in_only: dict, out_only: dict) -> dict:
    """Where a merged row's score, as printed (one decimal), is above both single adapters' (the paper
    underlines those): booleans shaped like :func:`summarize`'s output (matrix, per-source, per-target,
    average)."""
    above = lambda v, a, b: v is not None and round(v, 1) > max(round(a, 1), round(b, 1))
    return {"matrix": [[above(v, a, b) for v, a, b in zip(*rows, strict=True)]
                       for rows in zip(summary["matrix"], in_only["matrix"], out_only["matrix"], strict=True)],
            "from": {x: above(summary["from"][x], in_only["from"][x], out_only["from"][x]) for x in summary["from"]},
            "to": {x: above(summary["to"][x], in_only["to"][x], out_only["to"][x]) for x in summary["to"]},
            "avg": above(summary["avg"], in_only["avg"], out_only["avg"])}


def _cell(value: float | None, marked: bool = False) -> str:
    if value is None:
        return "-"
    return f"<u>{value:.1f}</u>" if marked else f"{value:.1f}"


def markdown_table(rows: Sequence[dict], langs: Sequence[str]) -> str:
    """Table 1 layout: one row per configuration (the paper's label) with its trainable-parameter
    percentage, the ``x->`` and ``->x`` chrF++ averages and the overall average; then each
    configuration's matrix. A row's ``marks`` (:func:`beats_both`) underline its cells."""
    head = ["", "%", *(f"{x}→" for x in langs), *(f"→{x}" for x in langs), "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in rows:
        s, m = row["summary"], row.get("marks") or {"from": {}, "to": {}, "avg": False}
        cells = [row["label"], f"{row['trainable_percent']:.2f}",
                 *(_cell(s["from"][x], m["from"].get(x, False)) for x in langs),
                 *(_cell(s["to"][x], m["to"].get(x, False)) for x in langs), _cell(s["avg"], m["avg"])]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines.append(f"\nchrF++ signature: `{rows[0]['signature']}`. Underlined: a merged score above both "
                     "LoRA_in's and LoRA_out's.")
    for row in rows:
        m = row.get("marks")
        lines += ["", f"**{row['label']}** (rows: source, columns: target)", "",
                  "| src \\ tgt | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
        for i, (src, values) in enumerate(zip(langs, row["summary"]["matrix"], strict=True)):
            lines.append(f"| {src} | " + " | ".join(_cell(v, bool(m) and m["matrix"][i][j])
                                                   for j, v in enumerate(values)) + " |")
    return "\n".join(lines) + "\n"


def settings_line(settings: Mapping) -> str:
    """What a table's scores were measured on, said above it (``Pipeline.eval_settings``)."""
    limit = settings["eval_limit"]
    sentences = "every sentence" if limit is None else f"the first {limit} sentence{'s' * (limit != 1)}"
    return (f"chrF++ on {sentences} of the {settings['split']!r} split per language, beam {settings['num_beams']}, "
            f"at most {settings['max_new_tokens']} new tokens, {settings['dtype']}.")


def trainable_percent(config: EvalConfig, adapter_params: int, base_params: int, num_layers: int) -> float:
    """Trainable parameters a direction uses under ``config``, in % of the base model: all of them
    for full fine-tuning, one adapter each for ``in``/``out``, plus two theta values per layer for
    learned weights."""
    if config.full:
        return 100.0
    extra = 2 * num_layers if config.learned else 0
    return 100.0 * (config.num_adapters() * adapter_params + extra) / base_params


def evaluate_configuration(adapters: AdapterController, tokenizer: Tokenizer, config: EvalConfig,
                           directions: Sequence[tuple[str, str]], sources: Mapping[str, Sequence[str]],
                           references: Mapping[str, Sequence[str]], *, pool: AdapterPool | None = None,
                           learned: Mapping[tuple[str, str], tuple[Tensor, Tensor]] | None = None,
                           search: SearchParams | None = None, batch_size: int = 16,
                           progress: Callable[[int], object] | None = None, **overrides) -> dict[tuple[str, str], dict]:
    """Translate every direction under ``config`` and score it.

    All directions share the batches: each row gets its own adapter pair (``in[src]``, ``out[tgt]``)
    through ``adapters.set_adapter_pairs`` (cleared afterwards).

    Args:
        pool: serves the adapters (needed unless ``config`` is the base model).
        learned: the per-layer ``(w_in, w_out)`` tensors [L] of each direction, for ``config.learned``.
        search, overrides: the beam search settings, as in :func:`modlora.generation.translate`.

    Returns:
        ``{(src, tgt): {"score", "signature", "hypotheses"}}``.

    Raises:
        ValueError: learned weights missing for a direction.
    """
    texts, srcs, tgts, pair_ids = [], [], [], []
    for k, (src, tgt) in enumerate(directions):
        texts += sources[src]
        srcs += [src] * len(sources[src])
        tgts += [tgt] * len(sources[src])
        pair_ids += [k] * len(sources[src])
    if config.num_adapters():
        pairs = []
        for src, tgt in directions:
            w_in, w_out = config.w_in, config.w_out
            if config.learned:
                if learned is None or (src, tgt) not in learned:
                    raise ValueError(f"configuration {config.name!r} needs the learned weights of {src}->{tgt}")
                w_in, w_out = learned[(src, tgt)]
            pairs.append((pool.get(src, "in") if config.use_in else None,
                          pool.get(tgt, "out") if config.use_out else None, w_in, w_out))
        adapters.set_adapter_pairs(pairs, config.strategy)
    else:
        adapters.clear()
    try:
        hypotheses = translate(adapters.model, tokenizer, texts, srcs, tgts, search, batch_size=batch_size,
                               pair_ids=pair_ids if config.num_adapters() else None, adapters=adapters,
                               progress=progress, **overrides)
    finally:
        adapters.clear()
    results, start = {}, 0
    for src, tgt in directions:
        hyps = hypotheses[start:start + len(sources[src])]
        start += len(hyps)
        results[(src, tgt)] = {**chrf_pp(hyps, references[tgt]), "hypotheses": hyps}
    return results
