"""chrF++ against sacrebleu itself; Table 1 averages against the matrix; each direction of a shared
evaluation batch against its adapter pair set alone."""

import subprocess
import sys

import pytest
import sacrebleu

from modlora.evaluate import chrf_pp, markdown_table, summarize, table1_configs, trainable_percent

HYPS = ["Le chat est assis sur le tapis.", "Il pleut des cordes aujourd'hui", "Bonjour le monde"]
REFS = ["Le chat s'est assis sur le tapis.", "Il pleut à verse aujourd'hui.", "Bonjour tout le monde"]


def test_chrf_pp_equals_sacrebleu_on_the_same_files(tmp_path):
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    got = chrf_pp(HYPS, REFS)
    api = sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                          "-m", "chrf", "--chrf-word-order", "2", "-b", "-w", "6"],
                         capture_output=True, text=True, check=True)
    assert got["score"] == pytest.approx(api.score, abs=1e-9)
    assert got["score"] == pytest.approx(float(cli.stdout), abs=1e-6)
    assert "nw:2" in got["signature"] and "nc:6" in got["signature"]  # chrF++, not chrF
    assert got["score"] != pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)


def test_chrf_pp_needs_aligned_lists():
    with pytest.raises(ValueError, match="2 hypotheses for 3 references"):
        chrf_pp(HYPS[:2], REFS)
    with pytest.raises(ValueError, match=r"chrF\+\+ of no sentences is undefined"):
        chrf_pp([], [])


LANGS = ["en", "fr", "de", "ja", "zh"]


def _scores():
    return {(s, t): 10.0 * i + j for i, s in enumerate(LANGS) for j, t in enumerate(LANGS) if s != t}


def test_table_averages_are_matrix_row_and_column_means():
    scores = _scores()
    summary = summarize(scores, LANGS)
    matrix = summary["matrix"]
    for i, lang in enumerate(LANGS):
        assert matrix[i][i] is None
        row = [v for v in matrix[i] if v is not None]
        col = [matrix[k][i] for k in range(len(LANGS)) if k != i]
        assert summary["from"][lang] == pytest.approx(sum(row) / len(row))
        assert summary["to"][lang] == pytest.approx(sum(col) / len(col))
    assert summary["avg"] == pytest.approx(sum(scores.values()) / 20)
    assert matrix[1][2] == scores[("fr", "de")]
    extra = summarize({**scores, ("en", "en"): 100.0, ("en", "sw"): 0.0}, LANGS)  # keys outside the table
    assert extra["avg"] == summary["avg"] and extra["from"] == summary["from"]


def test_table1_configurations_and_markdown():
    configs = table1_configs()
    assert [c.name for c in configs] == [
        "base", "full", "in only", "out only", "output 1:9", "output 3:7", "output 7:3", "output 9:1",
        "ab 1:9", "ab 3:7", "ab 7:3", "ab 9:1", "output learned", "ab learned"]
    assert configs[5].w_in == pytest.approx(0.3) and configs[5].w_out == pytest.approx(0.7)
    assert trainable_percent(configs[0], 100, 10_000, 24) == 0
    assert trainable_percent(configs[2], 50, 10_000, 24) == pytest.approx(0.5)
    assert trainable_percent(configs[12], 50, 10_000, 24) == pytest.approx(100 * (100 + 48) / 10_000)
    rows = [{"label": c.label, "trainable_percent": 1.0, "signature": "sig", "summary": summarize(_scores(), LANGS)}
            for c in configs[2:4]]
    md = markdown_table(rows, LANGS)
    assert "|  | % | en→ | fr→ |" in md
    assert "| LoRA_in | 1.00 |" in md and "chrF++ signature: `sig`" in md
    assert "| fr | 10.0 | - | 12.0 | 13.0 | 14.0 |" in md
    # x-> averages (row means), then ->x (column means), then all 20: worked out by hand
    assert "| LoRA_in | 1.00 | 2.5 | 12.2 | 22.0 | 31.8 | 41.5 | 25.0 | 23.5 | 22.0 | 20.5 | 19.0 | 22.0 |" in md


def test_each_direction_is_translated_by_its_own_pair(tmp_path):
    """All directions share batches (per-row pairs); each must equal in[src] + out[tgt] set alone."""
    import torch

    from modlora.adapters import AdapterController, LoraAdapter
    from modlora.evaluate import EvalConfig, evaluate_configuration
    from modlora.generation import translate
    from modlora.loading import random_model
    from modlora.pool import AdapterPool
    from modlora.tokenizer import Tokenizer

    model, tok = random_model("tiny", seed=0).eval(), Tokenizer.default()
    ctl = AdapterController(model)
    pool = AdapterPool(tmp_path)
    for seed, (lang, role) in enumerate((lx, r) for lx in ("en", "fr", "de") for r in ("in", "out")):
        a = LoraAdapter.init(model, rank=4, alpha=8, seed=seed, language=lang, role=role)
        with torch.no_grad():
            for _, B in a.tensors.values():
                B.copy_(torch.randn(B.shape, generator=torch.Generator().manual_seed(100 + seed)) * 0.5)
        pool.save(a)
    sources = {"en": ["The cat sleeps.", "It rains a lot today"], "fr": ["Le chat dort.", "Il pleut."],
               "de": ["Die Katze schläft hier.", "Es regnet."]}
    directions = [("fr", "de"), ("de", "en"), ("en", "fr")]
    learned = {d: (torch.linspace(0.2, 0.8, 2), torch.linspace(0.8, 0.2, 2)) for d in directions}
    kw = dict(num_beams=2, max_new_tokens=5, batch_size=6)
    configs = [EvalConfig("in only", use_in=True), EvalConfig("out only", use_out=True),
               EvalConfig("output 3:7", True, True, "output", 0.3, 0.7),
               EvalConfig("ab learned", True, True, "ab", learned=True)]
    for config in configs:
        got = evaluate_configuration(ctl, tok, config, directions, sources, sources, pool=pool, learned=learned,
                                     **kw)
        for src, tgt in directions:
            w_in, w_out = learned[(src, tgt)] if config.learned else (config.w_in, config.w_out)
            ctl.set_adapters(pool.get(src, "in") if config.use_in else None,
                               pool.get(tgt, "out") if config.use_out else None,
                               w_in=w_in, w_out=w_out, strategy=config.strategy)
            alone = translate(model, tok, sources[src], src, tgt, **kw)
            ctl.clear()
            assert got[(src, tgt)]["hypotheses"] == alone, (config.name, src, tgt)
            assert got[(src, tgt)]["score"] == chrf_pp(alone, sources[tgt])["score"]  # against the target's text
    base = evaluate_configuration(ctl, tok, EvalConfig("base"), directions, sources, sources, **kw)
    assert any(base[d]["hypotheses"] != got[d]["hypotheses"] for d in directions)  # the adapters mattered
