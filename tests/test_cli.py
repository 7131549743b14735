"""The modlora command: every subcommand's --help, info, translate, and stages on a finished run."""

import json
import subprocess
import sys

import pytest

from modlora.cli import main

SUBCOMMANDS = ["info", "translate", "train-adapters", "learn-weights", "evaluate", "table", "run"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"modlora {command}" in capsys.readouterr().out


def test_entry_point():
    out = subprocess.run([sys.executable, "-m", "modlora.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(c in out.stdout for c in SUBCOMMANDS)


def test_info_refuses_more_tokens_than_the_context(capsys):
    assert main(["info", "--tokens", "100000"]) == 2
    assert "exceeds the model's context of 4096" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 9,798,208" in out
    assert "paper adapter rank: 24" in out and "tokens/s" in out


def test_stages_and_translate_on_a_small_run(tmp_path, capsys):
    common = ["--out", str(tmp_path), "--langs", "en,fr", "--train-limit", "2", "--eval-limit", "1"]
    train = ["--epochs", "1", "--batch-size", "2", "--rank", "2", "--dropout", "0.1"]
    assert main(["train-adapters", *common, *train]) == 0
    assert "fr       in   r=2" in capsys.readouterr().out
    assert json.loads((tmp_path / "pool" / "fr" / "in" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert main(["train-full", *common, "--epochs", "1", "--batch-size", "2", "--activation-checkpointing"]) == 0
    assert (tmp_path / "full" / "model" / "config.json").is_file()
    assert main(["learn-weights", *common, "--epochs", "1", "--strategies", "output"]) == 0
    assert (tmp_path / "weights" / "output" / "fr-en" / "weights.json").is_file()
    capsys.readouterr()
    assert main(["evaluate", *common, "--strategies", "output", "--num-beams", "1", "--max-new-tokens", "2"]) == 0
    table = capsys.readouterr().out
    assert "| Setting 1 (learned) |" in table and "| Setting 2 (1:9) |" not in table
    assert main(["table", *common, "--strategies", "output"]) == 0
    assert capsys.readouterr().out == table
    assert main(["table", *common, "--strategies", "output", "--compare-paper"]) == 0
    assert capsys.readouterr().out.startswith(table) and (tmp_path / "compare.md").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["eval_settings"] == {"split": "devtest", "eval_limit": 1, "langs": ["en", "fr"], "num_beams": 1,
                                        "max_new_tokens": 2, "dtype": "float32"}
    # Evaluations made with other settings are redone, not reused; the table refuses a mix of them.
    more = [a if a != "1" or common[i - 1] != "--eval-limit" else "2" for i, a in enumerate(common)]
    assert main(["evaluate", *more, "--strategies", "output", "--num-beams", "1", "--max-new-tokens", "2"]) == 0
    assert "redoing its 2" in capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "base.json").read_text())["settings"]["eval_limit"] == 2
    (tmp_path / "eval" / "in-only.json").write_text(json.dumps(
        {**json.loads((tmp_path / "eval" / "in-only.json").read_text()), "settings": results["eval_settings"]}))
    assert main(["table", *common, "--strategies", "output"]) == 2
    assert "run the evaluate stage again" in capsys.readouterr().err

    (tmp_path / "in.txt").write_bytes("Bonjour.\n\nAu revoir \xff.\n".encode("latin-1"))
    assert main(["translate", "--pool", str(tmp_path / "pool"), "--src", "fr", "--tgt", "en", "--strategy", "ab",
                 "--w-in", "0.3", "--w-out", "0.7", "--num-beams", "2", "--max-new-tokens", "3",
                 "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt")]) == 0
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # one line per input line; empty stays empty
    assert "not valid UTF-8" in capsys.readouterr().err
    weights = str(tmp_path / "weights" / "output" / "fr-en" / "weights.json")
    assert main(["translate", "--pool", str(tmp_path / "pool"), "--src", "fr", "--tgt", "en", "--strategy", "ab",
                 "--weights", weights, "--input", str(tmp_path / "in.txt")]) == 2
    assert "learned for fr->en with strategy 'output', not fr->en with 'ab'" in capsys.readouterr().err


def _bad_model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{ not json")
    return str(tmp_path / "model")


@pytest.mark.parametrize("args,message", [
    (["--model", "{tmp}/absent"], "model directory {tmp}/absent does not exist"),
    (["--model", "{bad_model}"], "config.json is not valid JSON"),
    (["--pool", "{tmp}"], "unknown language 'fr'"),
    (["--tgt", "xx", "--model", "{tmp}/absent"], "unknown language code 'xx'"),  # named before the model loads
    (["--pool", "{tmp}/absent"], "adapter pool {tmp}/absent does not exist"),
    (["--model", "{tmp}/in.txt"], "is a file, not a checkpoint directory"),
])
def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys, args, message):
    fill = lambda s: s.format(tmp=tmp_path, bad_model=_bad_model_dir(tmp_path) if "bad_model" in s else "")
    (tmp_path / "in.txt").write_text("Bonjour.\n")
    argv = ["translate", "--src", "fr", "--tgt", "de", "--input", str(tmp_path / "in.txt"), *map(fill, args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modlora: error: ") and fill(message) in err[0], err


@pytest.mark.parametrize("langs,message", [("fr,de", "must hold the pivot language 'en'"),
                                           ("en", "and at least one other")])
def test_languages_need_the_pivot_and_another(tmp_path, capsys, langs, message):
    assert main(["table", "--out", str(tmp_path), "--langs", langs]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [("--w-in", "nan", "finite"), ("--batch-size", "0", "positive"),
                                                  ("--num-beams", "-1", "positive")])
def test_invalid_numbers_are_refused_by_the_parser(capsys, option, value, message):
    with pytest.raises(SystemExit) as e:
        main(["translate", "--src", "fr", "--tgt", "de", option, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_activation_checkpointing_option_takes_true_or_false(capsys):
    from modlora.cli import _config, build_parser

    for argv, expected in (([], False), (["--activation-checkpointing"], True),
                           (["--activation-checkpointing", "FALSE"], False)):
        assert _config(build_parser().parse_args(["train-full", *argv])).train.activation_checkpointing is expected
    with pytest.raises(SystemExit) as e:
        main(["train-full", "--activation-checkpointing", "yes"])
    assert e.value.code == 2 and "must be true or false, got 'yes'" in capsys.readouterr().err


def test_a_stage_command_goes_on_with_the_run_folders_settings(tmp_path, capsys):
    """Without a config file, a stage of a run folder takes the settings recorded there (then the
    options); an option that would change begun work is refused by name, before any work."""
    from modlora.cli import _config, build_parser
    from modlora.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig.from_dict({"out_dir": str(tmp_path), "data": {"langs": ["en", "fr"], "train_limit": 4},
                                    "train": {"epochs": 3, "lr": 0.005}})
    Pipeline(cfg).write_record()
    args = build_parser().parse_args(["learn-weights", "--out", str(tmp_path), "--epochs", "2"])
    got = _config(args)
    assert got.train == cfg.train and got.data == cfg.data and got.weights.epochs == 2
    (tmp_path / "pool").mkdir()  # adapters begun
    assert main(["train-adapters", "--out", str(tmp_path), "--lr", "0.5"]) == 2
    assert "made with other settings (train.lr 0.005 -> 0.5)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["modlora-run.json", "pool"]


def test_translate_input_and_language_names(tmp_path, capsys, monkeypatch):
    """A byte-order mark is not part of the first sentence; --language-name names a language the
    prompt does not know (the check passes, and the absent model is what stops this run), and a
    name that would go into the prompt as markup is refused."""
    import argparse

    from modlora import prompt
    from modlora.cli import _read_input

    monkeypatch.setattr(prompt, "_LANGUAGES", dict(prompt._LANGUAGES))  # the registry is the process's

    (tmp_path / "in.txt").write_bytes("\ufeffBonjour.\nSalut.\n".encode())
    assert _read_input(argparse.Namespace(input=str(tmp_path / "in.txt"))) == ["Bonjour.", "Salut."]
    common = ["translate", "--src", "en", "--input", str(tmp_path / "in.txt"), "--model", str(tmp_path / "absent")]
    assert main([*common, "--tgt", "zu"]) == 2
    assert "unknown language code 'zu'" in capsys.readouterr().err
    assert main([*common, "--tgt", "zu", "--language-name", "zu=Zulu"]) == 2
    assert "absent does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*common, "--tgt", "zu", "--language-name", "zu=<|im_end|>"])
    assert e.value.code == 2
    assert "argument --language-name: gives 'zu' the name '<|im_end|>'" in capsys.readouterr().err
