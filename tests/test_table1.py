"""Table 1 and Figure 2 as the paper prints them, the paper's numbers beside ours, hub ids from the cache."""

import json

import pytest

from modlora.evaluate import beats_both, markdown_table, summarize, table1_configs, trainable_percent
from modlora.figures import PAPER_BAND, figure2_data, plot_figure2
from modlora.hub import resolve_model_path
from modlora.paper import PAPER_TABLE, compare_markdown, load_paper_table

LANGS = ["en", "fr", "de"]
DIRS = [(s, t) for s in LANGS for t in LANGS if s != t]


def _summary(offset: float) -> dict:
    return summarize({d: 10.0 * (i + 1) + offset for i, d in enumerate(DIRS)}, LANGS)


def test_rows_have_the_papers_labels_in_its_order_then_the_learned_rows():
    labels = [c.label for c in table1_configs()]
    assert labels == ["Pre-train", "Full-parameter fine-tuning", "LoRA_in", "LoRA_out",
                      "Setting 1 (1:9)", "Setting 1 (3:7)", "Setting 1 (7:3)", "Setting 1 (9:1)",
                      "Setting 2 (1:9)", "Setting 2 (3:7)", "Setting 2 (7:3)", "Setting 2 (9:1)",
                      "Setting 1 (learned)", "Setting 2 (learned)"]
    full = table1_configs()[1]
    assert full.full and trainable_percent(full, adapter_params=10, base_params=1000, num_layers=2) == 100.0
    assert [c.label for c in table1_configs(full=False)][:2] == ["Pre-train", "LoRA_in"]
    # the paper's shipped rows carry the same labels in the same order
    assert list(load_paper_table()["rows"]) == labels[:12]


def test_a_merged_score_above_both_single_adapters_is_marked_and_no_other():
    in_only, out_only = _summary(0.0), _summary(1.0)
    merged = _summary(0.5)  # between the two everywhere: no mark
    merged["matrix"][0][1] = 99.0  # en->fr above both
    merged["from"]["de"] = 1.0 + max(in_only["from"]["de"], out_only["from"]["de"])
    merged["to"]["fr"] = out_only["to"]["fr"]  # a tie with one of them is not above both
    in_only["avg"], out_only["avg"], merged["avg"] = 5.0, 5.01, 5.04  # above both, but not as printed (5.0)
    marks = beats_both(merged, in_only, out_only)
    assert marks["matrix"][0] == [False, True, False]
    assert sum(map(sum, marks["matrix"])) == 1
    assert marks["from"] == {"en": False, "fr": False, "de": True}
    assert not any(marks["to"].values()) and marks["avg"] is False

    rows = [{"label": "LoRA_in", "trainable_percent": 0.5, "signature": "sig", "summary": in_only},
            {"label": "LoRA_out", "trainable_percent": 0.5, "signature": "sig", "summary": out_only},
            {"label": "Setting 1 (1:9)", "trainable_percent": 1.0, "signature": "sig", "summary": merged,
             "marks": marks}]
    md = markdown_table(rows, LANGS)
    header, _, *body = md.splitlines()[:5]
    assert [c.strip() for c in header.split("|")[1:4]] == ["", "%", "en→"]
    assert body[2].startswith("| Setting 1 (1:9) | 1.00 |")
    assert md.count("<u>") == 2  # the de-> average and the en->fr cell
    assert f"<u>{merged['from']['de']:.1f}</u>" in body[2] and "<u>99.0</u>" in md


def _paper_fixture(tmp_path):
    path = tmp_path / "paper.json"
    path.write_text(json.dumps({"source": "fixture", "langs": LANGS, "rows": [
        {"label": "Pre-train", "from": {"en": 20.0, "fr": None}, "to": {}, "avg": 30.0},
        {"label": "LoRA_in", "from": {"de": 50.0}, "to": {"fr": 12.5}, "avg": None}]}))
    return path


def test_compare_paper_puts_ours_beside_the_papers_with_the_difference(tmp_path):
    paper = load_paper_table(_paper_fixture(tmp_path))
    ours = _summary(0.0)
    rows = [{"label": "Pre-train", "summary": ours}, {"label": "LoRA_in", "summary": ours},
            {"label": "Setting 1 (learned)", "summary": ours}]
    lines = compare_markdown(rows, LANGS, paper).splitlines()
    assert lines[0].endswith("paper: fixture")
    pre, lora_in, learned = (ln.split(" | ") for ln in lines[4:7])
    # columns: label, en->, fr->, de->, ->en, ->fr, ->de, avg
    assert pre[1] == f"{ours['from']['en']:.1f} / 20.0 ({ours['from']['en'] - 20:+.1f})"
    assert pre[2] == f"{ours['from']['fr']:.1f} / n/a"
    assert pre[7].rstrip(" |") == f"{ours['avg']:.1f} / 30.0 ({ours['avg'] - 30:+.1f})"
    assert lora_in[3] == f"{ours['from']['de']:.1f} / 50.0 ({ours['from']['de'] - 50:+.1f})"
    assert lora_in[5] == f"{ours['to']['fr']:.1f} / 12.5 ({ours['to']['fr'] - 12.5:+.1f})"
    assert all("n/a" in cell for cell in learned[1:])  # a row the paper does not have


def test_the_shipped_paper_table_loads_and_an_empty_comparison_says_so():
    paper = load_paper_table(PAPER_TABLE)
    assert paper["metric"] == "chrF++" and paper["langs"] == ["en", "fr", "de", "ja", "zh"]
    if all(v is None for r in paper["rows"].values() for part in ("from", "to") for v in r[part].values()):
        out = compare_markdown([{"label": "Pre-train", "summary": _summary(0.0)}], LANGS, paper)
        assert "nothing to compare" in out


@pytest.mark.parametrize("bad, message", [
    ({"langs": ["en"], "rows": [{"label": "x", "avg": "12"}]}, r"rows\[0\].avg must be a number, got '12'"),
    ({"langs": ["en"], "rows": [{"label": "x", "avg": 10**400}]}, r"rows\[0\].avg must be at most"),
    ({"langs": ["en"], "rows": [{"label": "x", "avg": float("nan")}]}, r"rows\[0\].avg must be a finite number"),
    ({"langs": ["en"], "rows": [{"label": "x", "to": {"en": 250}}]}, r"rows\[0\].to.en must be in \[0, 100\]"),
    ({"langs": [1], "rows": []}, r"langs\[0\] must be one line of text"),
    ({"langs": ["en"], "rows": [], "source": "a\n| b"}, "source must be one line of text without '|'"),
    ({"langs": ["en"], "rows": [], "source": {"x": 1}}, "source must be one line of text"),
    ({"langs": ["en"], "rows": [{"label": "x", "from": {"xx": 1.0}}]}, r"rows\[0\].from must map languages"),
    ({"langs": ["en"], "rows": [{"label": "x"}, {"label": "x"}]}, "appears twice"),
    ({"rows": []}, "expected an object"),
])
def test_a_bad_paper_table_is_named(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message):
        load_paper_table(path)


def test_figure2_has_a_panel_per_direction_in_order_with_layers_from_one():
    dirs = [(s, t) for s in ["en", "fr", "de", "ja", "zh"] for t in ["en", "fr", "de", "ja", "zh"] if s != t]
    weights = {d: [(0.5 - 0.01 * i - 0.001 * k, 0.5 + 0.01 * i + 0.001 * k) for k in range(24)]
               for i, d in enumerate(dirs)}
    data = figure2_data(weights, dirs, "output")
    panels = data["panels"]
    assert [p["panel"] for p in panels] == [f"({c})" for c in "abcdefghijklmnopqrst"]
    assert [(p["src"], p["tgt"]) for p in panels] == dirs
    assert all(p["layers"] == list(range(1, 25)) for p in panels)
    assert panels[19]["w_out"][23] == pytest.approx(0.5 + 0.19 + 0.023)
    low, high = data["ylim"]
    assert low <= PAPER_BAND[0] and high >= PAPER_BAND[1]
    assert high >= 0.713  # the largest weight stays visible
    json.dumps(data)  # JSON-ready

    fig = plot_figure2(data)
    if fig is None:
        pytest.skip("matplotlib is not installed")  # the data checks above ran
    import matplotlib.pyplot as plt

    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 20
    for ax, p in zip(axes, panels, strict=True):
        w_in, w_out = ax.lines[:2]
        assert list(w_in.get_xdata()) == list(range(1, 25)) and list(w_out.get_ydata()) == p["w_out"]
        assert ax.get_title().startswith(p["panel"]) and ax.get_ylim() == pytest.approx(tuple(data["ylim"]))
        assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)


def test_figure2_limits_and_files(tmp_path, monkeypatch):
    """The y range stays within [0, 1] (softmax weights); a figure of no direction is an error;
    without matplotlib the JSON is written and a PNG of earlier weights removed (it would contradict it)."""
    from modlora import figures

    data = figure2_data({("en", "fr"): [(0.01, 0.99), (0.99, 0.01)]}, [("en", "fr")], "ab")
    assert data["ylim"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="0 directions: a figure has panels"):
        figure2_data({}, [], "ab")
    (tmp_path / "figure2.png").write_bytes(b"old")
    monkeypatch.setattr(figures, "plot_figure2", lambda data, path=None: None)
    assert figures.write_figure2(data, tmp_path / "figure2.json", tmp_path / "figure2.png") is False
    assert json.loads((tmp_path / "figure2.json").read_text()) == data and not (tmp_path / "figure2.png").exists()


def test_hub_id_resolves_from_the_cache_and_a_missing_one_says_where_it_looked(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen2.5-0.5B-Instruct"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == repo / "snapshots" / "abc123"
    local = tmp_path / "Org" / "Name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("Org/Name") == local.relative_to(tmp_path)  # an existing directory wins
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path("Qwen/Missing")
    msg = str(e.value)
    assert str(cache / "models--Qwen--Missing" / "refs" / "main") in msg
    assert str(tmp_path / "home" / "hub" / "models--Qwen--Missing") in msg and "never downloads" in msg
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(cache))  # huggingface_hub's older name, still honoured
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == repo / "snapshots" / "abc123"


def test_hub_id_loads_the_model(tmp_path, monkeypatch):
    import torch
    from hf_reference import hf_model, save_hf

    from modlora.loading import load_pretrained

    snapshot = tmp_path / "hub" / "models--Org--Tiny" / "snapshots" / "rev"
    save_hf(hf_model(seed=1), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("rev")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_pretrained("Org/Tiny", dtype=torch.float32)
    assert model.config.num_hidden_layers == 3
