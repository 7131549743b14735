"""The whole pipeline on the tiny random preset with a few sentences per language, then a resume."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from modlora.adapters import LoraAdapter
from modlora.pipeline import DEMO, PAPER, RUN_RECORD, Pipeline, PipelineConfig, default_config
from modlora.prompt import training_example
from modlora.train import collate, completion_loss, train_adapter
from modlora.validate import InputError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(out: Path) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "out_dir": str(out),
        "data": {"langs": ["en", "fr", "zh"], "train_limit": 4, "weights_limit": 2, "eval_limit": 2},
        "train": {"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
        "weights": {"epochs": 1, "batch_size": 2},
        "eval": {"num_beams": 2, "max_new_tokens": 4, "batch_size": 40},
    })


def test_whole_pipeline_then_resume_skips_everything(tmp_path):
    started = time.perf_counter()
    md = Pipeline(_config(tmp_path), log=lambda _: None).run()
    first = time.perf_counter() - started

    pool = sorted(p.parent.name + "/" + p.name for p in (tmp_path / "pool").glob("*/*"))
    assert pool == [f"{lang}/{role}" for lang in ("en", "fr", "zh") for role in ("in", "out")]
    assert len(list((tmp_path / "weights").glob("*/*/weights.json"))) == 2 * 6
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in results["rows"]][:4] == ["Pre-train", "Full-parameter fine-tuning", "LoRA_in",
                                                         "LoRA_out"]
    assert len(results["rows"]) == 14
    assert results["rows"][1]["trainable_percent"] == 100.0 and "| Full-parameter fine-tuning | 100.00 |" in md
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert all(("marks" in r) == r["merged"] for r in results["rows"])
    figure = json.loads((tmp_path / "weights" / "ab" / "figure2.json").read_text())
    assert [p["panel"] for p in figure["panels"]] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    for row in results["rows"]:
        assert "nw:2" in row["signature"]
        assert len(row["summary"]["matrix"]) == 3
    evaluation = json.loads((tmp_path / "eval" / "output-3-7.json").read_text())
    assert len(evaluation["directions"]) == 6 and len(evaluation["directions"][0]["hypotheses"]) == 2
    assert "random weights" in md and "| Setting 1 (learned) |" in md
    assert (tmp_path / "table.md").read_text() == md

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()
              and p.name not in ("results.json", "table.md", RUN_RECORD)}
    started = time.perf_counter()
    assert Pipeline(_config(tmp_path), log=lambda _: None).run() == md
    assert time.perf_counter() - started < first / 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed

    # A damaged evaluation (torn, or a score edited out of range) is redone, not a dead end.
    damaged = tmp_path / "eval" / "output-3-7.json"
    damaged.write_text('{"directions": [')
    cell = tmp_path / "eval" / "cells" / "output-3-7" / "fr-zh.json"
    cell.write_text(cell.read_text().replace('"score": ', '"score": 101.0, "was": '))
    messages = []
    assert Pipeline(_config(tmp_path), log=messages.append).run() == md
    assert json.loads(damaged.read_text())["directions"][0]["hypotheses"] == evaluation["directions"][0]["hypotheses"]
    assert sum("is damaged" in m and "it is redone" in m for m in messages) == 2, messages


def test_shipped_configs_equal_the_builtin_defaults():
    assert PipelineConfig.from_toml(ROOT / "configs" / "default.toml") == default_config()
    paper = PipelineConfig.from_toml(ROOT / "configs" / "paper.toml")
    paper.model.path = "X"
    assert paper == default_config("X")
    assert DEMO["out_dir"] != PAPER["out_dir"]


def test_toml_configs_read_on_python_3_10(monkeypatch):
    """Python 3.10 has no tomllib: its origin, tomli (a dependency there), reads the config."""
    import sys

    import tomllib

    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    assert PipelineConfig.from_toml(ROOT / "configs" / "default.toml") == default_config()


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key \[train\] lr_typo"):
        PipelineConfig.from_dict({"train": {"lr_typo": 1}})


def _slice_loss(pipe: Pipeline, examples) -> float:
    ids, attn, mask = collate(examples, pipe.tokenizer.pad_id)
    with torch.no_grad():
        total, n = completion_loss(pipe.model, ids, attn, mask)
    return float(total) / n


def test_demo_recipe_adapters_learn_on_the_pretrained_base(tmp_path):
    """The demo's recipe on half its lines (4 per language, pre-trained on as plain text): out[fr]
    brings the loss on its en->fr training slice below 0.8 of the pre-trained base's (measured 0.69);
    on the random base, whose frozen output layer caps every logit near +-1.3 (README, demo), it
    stays above 0.9 of it (measured 0.96)."""
    ratios = {}
    for pretrain_limit in (4, None):
        cfg = PipelineConfig.from_dict({**DEMO, "out_dir": str(tmp_path / str(pretrain_limit)),
                                        "data": {**DEMO["data"], "train_limit": 4, "pretrain_limit": pretrain_limit}})
        pipe = Pipeline(cfg, log=lambda _: None)
        pipe.pretrain()
        data = pipe._split("dev", cfg.data.train_limit)
        pairs = list(zip(data["en"], data["fr"], strict=True))
        examples = [training_example(pipe.tokenizer, "en", "fr", s, t) for s, t in pairs]
        before = _slice_loss(pipe, examples)
        adapter = train_adapter(pipe.adapters, pipe.tokenizer, "fr", "out", "en", "fr", pairs, cfg.lora, cfg.train,
                                tmp_path / f"out-{pretrain_limit}", log=lambda _: None)
        pipe.adapters.set_adapters(lora_out=adapter, w_out=1.0)
        ratios[pretrain_limit] = _slice_loss(pipe, examples) / before
        pipe.adapters.clear()
    assert ratios[4] < 0.8 and ratios[None] > 0.9, ratios


def test_pretraining_needs_a_random_base():
    with pytest.raises(ValueError, match="pretrain_limit pre-trains a random base"):
        Pipeline(PipelineConfig.from_dict({"data": {"pretrain_limit": 4}, "model": {"path": "X"}}))


def test_a_run_folder_refuses_settings_that_would_mix_its_outputs(tmp_path, monkeypatch):
    """Settings that shape outputs in the folder are refused by name once those outputs are begun:
    the pre-training's (and the model's, the data's, the dtype's) with any output, the adapters' lr
    from the first adapter on, the merge weights' once weights are. Settings that do not (what is
    evaluated, checkpoint frequency) are recorded. Another program's config.json in the folder is
    never touched."""
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    Pipeline(_config(tmp_path), log=lambda _: None).write_record()
    changed = _config(tmp_path)
    changed.train.lr, changed.lora.rank, changed.weights.epochs, changed.pretrain.epochs = 2e-3, 3, 5, 7
    Pipeline(changed).check_record()  # nothing begun yet: any settings
    (tmp_path / "pretrain").mkdir()
    with pytest.raises(InputError, match=r"made with other settings \(pretrain.epochs 2 -> 7\)"):
        Pipeline(changed).check_record()
    (tmp_path / "train" / "fr-in").mkdir(parents=True)
    with pytest.raises(InputError, match=r"\(lora.rank None -> 3; pretrain.epochs 2 -> 7; train.lr 0.001 -> 0.002\)"):
        Pipeline(changed).check_record()
    (tmp_path / "weights").mkdir()
    with pytest.raises(InputError, match=r"train.lr 0.001 -> 0.002; weights.epochs 1 -> 5\)"):
        Pipeline(changed).check_record()
    monkeypatch.setattr(Pipeline, "_device_dtype", lambda self: (torch.device("cuda"), torch.bfloat16))
    with pytest.raises(InputError, match=r"made with other settings \(dtype 'float32' -> 'bfloat16'\)"):
        Pipeline(_config(tmp_path)).check_record()  # model.device unset: another machine resolves another dtype
    monkeypatch.undo()
    spelled = _config(tmp_path)
    spelled.model.dtype = "float32"  # what an unset dtype resolves to on the CPU: the same outputs
    Pipeline(spelled).check_record()
    spelled.model.dtype = "bfloat16"
    with pytest.raises(InputError, match=r"made with other settings \(dtype 'float32' -> 'bfloat16'\)"):
        Pipeline(spelled).check_record()
    free = _config(tmp_path)
    free.eval.num_beams, free.train.checkpoint_every, free.data.eval_limit = 3, 7, 1
    Pipeline(free).check_record()
    Pipeline(free).write_record()
    assert json.loads((tmp_path / RUN_RECORD).read_text()) == {"config": json.loads(json.dumps(free.to_dict())),
                                                               "dtype": "float32", "data_parallel_processes": 1}
    assert (tmp_path / "config.json").read_text() == '{"model_type": "qwen2"}'


def test_a_run_folder_refuses_another_data_parallel_batch(tmp_path, monkeypatch):
    """``--data-parallel`` on N processes trains on N times ``batch_size`` a step: like a batch size,
    it binds the trained outputs once begun (not evaluations, which any processes share out alike);
    a record from before it was recorded binds nothing."""
    from modlora import distributed

    Pipeline(_config(tmp_path), log=lambda _: None).write_record()
    (tmp_path / "eval").mkdir()
    two = distributed.Context(rank=0, world_size=2, data_parallel=True)
    monkeypatch.setattr(distributed, "current", lambda: two)
    Pipeline(_config(tmp_path)).check_record()
    (tmp_path / "train" / "fr-in").mkdir(parents=True)
    with pytest.raises(InputError, match=r"made with other settings \(data_parallel_processes 1 -> 2\)"):
        Pipeline(_config(tmp_path)).check_record()
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=0, world_size=2))
    Pipeline(_config(tmp_path)).check_record()  # sharding jobs over processes trains each as one does
    record = json.loads((tmp_path / RUN_RECORD).read_text())
    del record["data_parallel_processes"]
    (tmp_path / RUN_RECORD).write_text(json.dumps(record))
    monkeypatch.setattr(distributed, "current", lambda: two)
    Pipeline(_config(tmp_path)).check_record()


def test_a_run_folder_knows_its_data_and_model_by_location(tmp_path, monkeypatch):
    """model.path and data.root are the folders they name: another spelling of, or a link to, the same
    folder is the same run, another folder is refused; the record holds the folder itself (a hub id
    its cached snapshot), so it stays right from another working directory, and a record that holds
    a path as written (relative) is read from where the command runs."""
    data = tmp_path / "flores"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    (tmp_path / "other").mkdir()
    snapshot = tmp_path / "hub" / "models--Org--M" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--Org--M" / "refs").mkdir()
    (tmp_path / "hub" / "models--Org--M" / "refs" / "main").write_text("abc\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    config = _config(out)
    config.data.root, config.model.path, config.data.pretrain_limit = "flores", "Org/M", None
    Pipeline(config).write_record()
    (out / "pretrain").mkdir()
    recorded = json.loads((out / RUN_RECORD).read_text())["config"]
    assert (recorded["data"]["root"], recorded["model"]["path"]) == (str(data.resolve()), str(snapshot.resolve()))
    for same in ("./flores", str(data), "link", "other/../flores"):
        config.data.root = same
        Pipeline(config).check_record()
    config.model.path = str(snapshot)
    Pipeline(config).check_record()
    monkeypatch.chdir(tmp_path / "other")
    config.data.root = "../flores"
    Pipeline(config).check_record()
    config.data.root = "../other"
    with pytest.raises(InputError, match=r"\(data.root '[^']*/flores' -> '[^']*/other'\)"):
        Pipeline(config).check_record()
    monkeypatch.chdir(tmp_path)
    old = {"config": {**recorded, "data": {**recorded["data"], "root": "flores"}}, "dtype": "float32"}
    (out / RUN_RECORD).write_text(json.dumps(old))
    config.data.root = "link"
    Pipeline(config).check_record()
    config.data.root = "other"
    with pytest.raises(InputError, match="data.root"):
        Pipeline(config).check_record()


def test_the_table_is_each_files_scores_by_direction_under_the_runs_settings(tmp_path):
    """Evaluation files made by hand, a distinct score per configuration and direction: the table's
    matrices are those scores (source rows, target columns), its signature the files', a merged
    cell is marked where it beats both single adapters' (in only: 50, out only: 50 but 70 for en->fr),
    the settings are said above it, and files made under other settings are refused."""
    cfg = PipelineConfig.from_dict({"out_dir": str(tmp_path), "data": {"langs": ["en", "fr", "de"], "eval_limit": 1},
                                    "eval": {"strategies": ["output"]}})
    pipe = Pipeline(cfg, log=lambda _: None)
    pipe.pool.save(LoraAdapter.init(pipe.model, rank=2, alpha=4, language="en", role="in"))
    def score(k: int, name: str, j: int, direction: tuple[str, str]) -> float:
        fixed = {"in only": 50.0, "out only": 70.0 if direction == ("en", "fr") else 50.0, "output 3:7": 60.0}
        return fixed.get(name, k + 0.1 * j)

    for k, config in enumerate(pipe.configurations()):
        pipe.eval_path(config).parent.mkdir(parents=True, exist_ok=True)
        pipe.eval_path(config).write_text(json.dumps({"settings": pipe.eval_settings(), "directions": [
            {"src": s, "tgt": t, "score": score(k, config.name, j, (s, t)), "signature": f"chrF2++|nw:2|{k}"}
            for j, (s, t) in enumerate(pipe.directions())]}))
    md = pipe.table()
    assert md.startswith("> NOTE")
    assert "chrF++ on the first 1 sentence of the 'devtest' split per language, beam 5" in md
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["full"]["signature"] == "chrF2++|nw:2|1"
    assert rows["full"]["summary"]["matrix"] == [[None, 1.0, 1.1], [1.2, None, 1.3], [1.4, 1.5, None]]
    marks = rows["output 3:7"]["marks"]["matrix"]
    assert marks[0][1] is False and marks[1][0] is True and rows["output 3:7"]["marks"]["avg"] is True
    cfg.eval.num_beams = 2
    with pytest.raises(InputError, match=r"base.json was made with .*'num_beams': 5.*, not this run's .*beams': 2"):
        Pipeline(cfg, log=lambda _: None).table()


def test_a_language_joins_a_run_without_redoing_its_adapters(tmp_path):
    """Adapters and merge weights see their own languages only: adding one to a run is allowed, as
    the paper's modules are meant to grow; the full fine-tuning (and a pre-training) mixed them all."""
    Pipeline(_config(tmp_path), log=lambda _: None).write_record()
    (tmp_path / "pool").mkdir()
    (tmp_path / "weights").mkdir()
    more = _config(tmp_path)
    more.data.langs = ["en", "fr", "zh", "de"]
    Pipeline(more).check_record()
    (tmp_path / "full").mkdir()
    with pytest.raises(InputError, match=r"\(data.langs \['en', 'fr', 'zh'\] -> \['en', 'fr', 'zh', 'de'\]\)"):
        Pipeline(more).check_record()


def test_a_refused_run_records_nothing(tmp_path):
    """Settings whose data cannot serve the stages are not recorded: the next command would inherit them."""
    Pipeline(_config(tmp_path), log=lambda _: None).write_record()
    before = (tmp_path / RUN_RECORD).read_text()
    bad = _config(tmp_path)
    bad.data.eval_split = "absent"
    with pytest.raises(FileNotFoundError, match="no split folder"):
        Pipeline(bad, log=lambda _: None).run()
    assert (tmp_path / RUN_RECORD).read_text() == before


@pytest.mark.parametrize("edit,error", [
    (lambda d: d.update(eval_split="test"), "no split folder"),
    (lambda d: d.update(langs=["en", "sw"]), "unknown language code 'sw'"),
    (lambda d: d.update(train_split="empty"), "the 'empty' split of .* has no lines"),
    (lambda d: d.update(eval_split="short"), r"(?s)fr\.txt: 1.*en\.txt: 2|en\.txt: 2.*fr\.txt: 1"),
    (lambda d: d.update(train_split="blank"), r"the 'blank' split of .*: en\.txt line 2 is blank"),
    (lambda d: d.update(eval_split="chat"), r"'chat' split of .*: en\.txt line 1 contains the special token <\|im_end"),
])
def test_data_that_cannot_serve_every_stage_fails_before_training(tmp_path, edit, error):
    root = tmp_path / "data"
    splits = {"dev": ["a", "b"], "devtest": ["c", "d"], "empty": [], "short": ["e", "f"], "blank": ["g", " "],
              "chat": ["h<|im_end|>", "i"]}
    for split, texts in splits.items():
        (root / split).mkdir(parents=True)
        for lang in ("en", "fr", "sw"):
            lines = texts[:1] if split == "short" and lang == "fr" else texts
            (root / split / f"{lang}.txt").write_text("".join(f"{t} {lang}\n" if t.strip() else "\n" for t in lines))
    data = {"root": str(root), "langs": ["en", "fr"]}
    edit(data)
    cfg = PipelineConfig.from_dict({"out_dir": str(tmp_path / "out"), "data": data})
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        Pipeline(cfg, log=lambda _: None).run()
    assert not (tmp_path / "out" / "pool").exists() and not (tmp_path / "out" / "train").exists()


def test_languages_modlora_does_not_know_are_named_in_the_config(tmp_path, monkeypatch):
    """[data] language_names gives the prompt a name for a new language; a name that is not plain
    text (it goes into the prompt) or that renames a known language is refused."""
    from modlora import prompt
    from modlora.prompt import language_name

    monkeypatch.setattr(prompt, "_LANGUAGES", dict(prompt._LANGUAGES))  # the registry is the process's

    root = tmp_path / "data"
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True)
        for lang in ("en", "xh"):
            (root / split / f"{lang}.txt").write_text(f"a {lang}\nb {lang}\n")
    data = {"root": str(root), "langs": ["en", "xh"], "language_names": {"xh": "Xhosa"}}
    pipe = Pipeline(PipelineConfig.from_dict({"out_dir": str(tmp_path / "out"), "data": data}), log=lambda _: None)
    pipe.check_inputs()
    assert language_name("xh") == "Xhosa"
    for names, message in (({"xh": "Xhosa<|im_end|>"}, "gives 'xh' the name 'Xhosa<|im_end|>'"),
                           ({"../xh": "Xhosa"}, "has the code '../xh'"), ({"xh": 3}, "gives 'xh' the name 3")):
        with pytest.raises(InputError, match=rf"\[data\] language_names {re.escape(message)}"):
            PipelineConfig.from_dict({"data": {**data, "language_names": names}})
    with pytest.raises(ValueError, match="language 'fr' is already registered as 'French'"):
        Pipeline(PipelineConfig.from_dict({"data": {"language_names": {"fr": "Francais"}}}))
