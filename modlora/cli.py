"""The ``modlora`` command: info, translate, and the pipeline's stages (train-adapters, learn-weights,
evaluate, table) or all of them at once (run). Results go to stdout, progress and logs to stderr.

Without ``--model DIR`` the base is the embedded random-weight tiny preset (real Qwen2.5 tokenizer
and vocabulary): everything runs, nothing translates. ``--model DIR`` (a Qwen2.5-0.5B-Instruct
checkpoint) switches the pipeline to the paper's setup.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import distributed, validate
from .adapters import AdapterController, LearnedWeights
from .console import log_stderr, progress
from .fileio import atomic_write_text, read_json
from .generation import SearchParams, translate
from .kernels.reference import STRATEGIES
from .loading import load_pretrained, random_model
from .model import Qwen2ForCausalLM
from .paper import PAPER_TABLE
from .pipeline import RANDOM_BASE_NOTE, RUN_RECORD, Pipeline, PipelineConfig, default_config
from .pool import AdapterPool
from .prompt import language_name, register_language
from .tokenizer import Tokenizer
from .train import base_parameters, lora_parameters_per_rank, paper_rank
from .validate import cli_rule, cli_type

DEFAULT_PRESET = "tiny"  # the random-weight base when neither --model nor a config names one

RUN_EPILOG = """examples:
  modlora run                              # the demo: random tiny base, FLORES slice, a few minutes on CPU
  modlora run --model Qwen2.5-0.5B-Instruct  # the paper: full FLORES-101 dev/devtest (GPU advised)
  modlora run configs/paper.toml --out runs/mine
Finished work (adapters, weights, evaluations) is skipped; an interrupted training resumes from its checkpoint.
The run folder keeps its settings (modlora-run.json): later stage commands go on with them, and a change
that would mix its outputs is refused."""


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other error: one line ``modlora: error: ...``, exit status 2."""

    def error(self, message: str) -> None:
        command = self.prog.removeprefix("modlora").strip()
        print(f"modlora: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF Qwen2 checkpoint directory, or a hub id (Qwen/Qwen2.5-0.5B-Instruct) in the "
                                   "local Hugging Face cache (default: a random-weight preset)")
    p.add_argument("--preset", type=cli_type("model", "preset"),
                   help=f"random-weight preset when no --model: tiny or qwen2.5-0.5b (default: the config's, else "
                        f"{DEFAULT_PRESET})")


def _pipeline_args(p: argparse.ArgumentParser, *, config_positional: bool = False) -> None:
    if config_positional:
        p.add_argument("config", nargs="?", help="TOML config (default: the demo, or the paper's setup with --model)")
    else:
        p.add_argument("--config", help="TOML config (default: the demo, or the paper's setup with --model)")
    _model_args(p)
    p.add_argument("--out", type=cli_type("", "out_dir"), help="output directory (default: the config's out_dir)")
    p.add_argument("--data", help="FLORES-style folder split/lang.txt (default: the vendored FLORES-101)")
    p.add_argument("--langs", type=cli_type("data", "langs"),
                   help="comma-separated language codes, e.g. en,fr,de,ja,zh")
    p.add_argument("--train-limit", type=cli_type("data", "train_limit"), help="use the first N training sentences")
    p.add_argument("--eval-limit", type=cli_type("data", "eval_limit"), help="evaluate on the first N sentences")
    p.add_argument("--strategies", type=cli_type("eval", "strategies"),
                   help="comma-separated merge strategies to learn and evaluate: output,ab")


def _data_parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-parallel", action="store_true",
                   help="under torchrun: train each job on all processes (gradients summed; global batch = batch x "
                        "grad accum x processes) instead of giving each process its own jobs")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=cli_type("train", "epochs"), help="passes over the data (default: the config's)")
    p.add_argument("--lr", type=cli_type("train", "lr"), help="peak learning rate (default: the config's)")
    p.add_argument("--batch-size", type=cli_type("train", "batch_size"),
                   help="examples per micro-batch (default: the config's)")
    p.add_argument("--grad-accum", type=cli_type("train", "grad_accum"),
                   help="micro-batches per optimizer step (default: the config's)")
    p.add_argument("--activation-checkpointing", type=cli_type("train", "activation_checkpointing"), nargs="?",
                   const=True, metavar="true|false",
                   help="recompute each layer in the backward pass: same gradients, less memory (default: the "
                        "config's, false)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-beams", type=cli_type("eval", "num_beams"), help="beam width (default: the config's, 5)")
    p.add_argument("--max-new-tokens", type=cli_type("eval", "max_new_tokens"),
                   help="tokens generated at most per sentence")
    p.add_argument("--eval-batch-size", type=cli_type("eval", "batch_size"), help="sentences per generation batch")


def _config(args: argparse.Namespace) -> PipelineConfig:
    """The config file's settings, else those recorded in the run folder (a later stage of a run goes
    on with its settings), else the built-in defaults; then the command-line options."""
    if args.config:
        cfg = PipelineConfig.from_toml(args.config)
    else:
        cfg = default_config(args.model)
        record = Path(args.out or cfg.out_dir) / RUN_RECORD
        if record.is_file():
            cfg = PipelineConfig.from_dict(validate.json_object(read_json(record), record).get("config"),
                                           f"{record}: config")
            cfg.out_dir = str(record.parent)
    if args.model:
        cfg.model.path = args.model
    for attr, section, key in [("preset", cfg.model, "preset"), ("out", cfg, "out_dir"), ("data", cfg.data, "root"),
                               ("train_limit", cfg.data, "train_limit"), ("eval_limit", cfg.data, "eval_limit"),
                               ("rank", cfg.lora, "rank"), ("alpha", cfg.lora, "alpha"),
                               ("dropout", cfg.lora, "dropout"),
                               ("num_beams", cfg.eval, "num_beams"), ("max_new_tokens", cfg.eval, "max_new_tokens"),
                               ("eval_batch_size", cfg.eval, "batch_size")]:
        if getattr(args, attr, None) is not None:
            setattr(section, key, getattr(args, attr))
    if args.langs:
        cfg.data.langs = args.langs
    if getattr(args, "strategies", None):
        cfg.eval.strategies = args.strategies
    train = cfg.weights if args.command == "learn-weights" else cfg.train
    for attr in ("epochs", "lr", "batch_size", "grad_accum", "activation_checkpointing"):
        if getattr(args, attr, None) is not None:
            setattr(train, attr, getattr(args, attr))
    return cfg


def _auto_threads(args: argparse.Namespace, model_path: str | None, preset: str | None) -> None:
    if args.threads is None and not model_path and (preset or DEFAULT_PRESET) == "tiny":
        torch.set_num_threads(1)  # measured: the demo pipeline 2.4 min on 1 thread, over 10 min on 2 (busy box)


def _stage(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.command != "table":  # fail now, not after hours of training
        validate.writable_dir(cfg.out_dir, "output directory")
    _auto_threads(args, cfg.model.path, cfg.model.preset)
    pipe = Pipeline(cfg)
    ctx = distributed.init(args.command, cfg.to_dict(), data_parallel=getattr(args, "data_parallel", False))
    try:
        counts = pipe.job_counts()
        # in run, full fine-tuning is one more job of the first stage
        for stage in [s for s in counts if s != "train-full"] if args.command == "run" else [args.command]:
            if stage in counts:
                ctx.check_jobs(stage, counts[stage][0], training=counts[stage][1])
        started = time.perf_counter()
        if args.command == "table":  # reads a finished run, perhaps read-only: checked, not recorded
            pipe.check_record()
        elif args.command != "run":  # run starts itself
            pipe.start()
            pipe.pretrain()  # every stage starts from the pre-trained base (when the config has one)
        if args.command == "train-adapters":
            pipe.train_adapters()
            output = pipe.pool.listing() if ctx.is_writer else ""
        elif args.command == "train-full":
            pipe.train_full()
            output = f"full fine-tuning: {pipe.full_model_dir()}"
        elif args.command == "learn-weights":
            pipe.learn_weights()
            output = f"learned weights under {pipe.out / 'weights'}"
        elif args.command == "evaluate":
            pipe.evaluate()
            output = pipe.table() if ctx.is_writer else ""
        elif args.command == "table":
            output = pipe.table(args.compare_paper) if ctx.is_writer else ""
        else:
            output = pipe.run()
    finally:
        distributed.shutdown()
    if ctx.is_writer:  # of several processes, rank 0 reports
        print(output)
        log_stderr(f"done in {time.perf_counter() - started:.0f}s; outputs in {pipe.out}")
        if args.command in ("run", "evaluate", "table") and not cfg.model.path:
            log_stderr(RANDOM_BASE_NOTE)
    return 0


def _load_model(model_dir: str | None, preset: str | None) -> Qwen2ForCausalLM:
    return load_pretrained(model_dir) if model_dir else random_model(preset or DEFAULT_PRESET, seed=0)


def _info(args: argparse.Namespace) -> int:
    _auto_threads(args, args.model, args.preset)
    model = _load_model(args.model, args.preset)
    c = model.config
    if args.tokens > c.max_position_embeddings:
        raise ValueError(f"--tokens {args.tokens} exceeds the model's context of {c.max_position_embeddings}")
    print(f"model: {args.model or f'random preset {args.preset or DEFAULT_PRESET!r} (embedded default)'}")
    print(f"shape: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
          f"heads {c.num_attention_heads} (kv {c.num_key_value_heads}), vocab {c.vocab_size}, dtype {c.dtype}")
    n = base_parameters(model)
    rank = paper_rank(model)
    per_rank = lora_parameters_per_rank(model)
    print(f"parameters: {n:,}")
    print(f"paper adapter rank: {rank} ({rank * per_rank:,} parameters per adapter, {100 * rank * per_rank / n:.2f}%)")
    ids = torch.randint(0, min(c.vocab_size, 151643), (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)
        start = time.perf_counter()
        model(ids)
        ms = (time.perf_counter() - start) * 1e3
    print(f"forward: 1 x {args.tokens} tokens in {ms:.1f} ms ({args.tokens / ms * 1e3:,.0f} tokens/s, "
          f"{torch.get_num_threads()} threads)")
    return 0


def _read_input(args: argparse.Namespace) -> list[str]:
    raw = Path(args.input).read_bytes() if args.input else sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log_stderr(f"warning: input is not valid UTF-8 ({e}); undecodable bytes replaced by U+FFFD")
        text = raw.decode("utf-8", errors="replace")
    lines = text.removeprefix("\ufeff").split("\n")  # a byte-order mark is not text
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _language_name(text: str) -> tuple[str, str]:
    """``CODE=NAME`` of ``--language-name``, checked as ``[data] language_names`` is."""
    code, _, name = text.partition("=")
    try:
        validate.SETTINGS["data"]["language_names"]({code.strip(): name.strip()})
    except validate.InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return code.strip(), name.strip()


def _translate(args: argparse.Namespace) -> int:
    if args.output:  # fail now, not after all the translating
        validate.writable_output(args.output, "--output")
    for code, name in args.language_name or ():
        register_language(code, name)
    for code, what in ((args.src, "--src"), (args.tgt, "--tgt")):  # named before the model loads
        language_name(validate.plain_name(code, what))
    texts = _read_input(args)
    validate.check_input_lines(texts, args.input or "stdin")
    _auto_threads(args, args.model, args.preset)
    model = _load_model(args.model, args.preset)
    tok = Tokenizer.for_model(args.model)
    if args.pool:
        pool = AdapterPool(args.pool)
        lora_in = pool.get(args.src, "in") if args.use in ("both", "in") else None
        lora_out = pool.get(args.tgt, "out") if args.use in ("both", "out") else None
        w_in, w_out = args.w_in, args.w_out
        if args.weights:
            learned = LearnedWeights.load(args.weights, args.src, args.tgt, args.strategy,
                                          model.config.num_hidden_layers)
            w_in, w_out = learned.w_in, learned.w_out
        elif args.use != "both":  # one adapter alone is used at full strength
            w_in = w_out = 1.0
        AdapterController(model).set_adapters(lora_in=lora_in, lora_out=lora_out, w_in=w_in, w_out=w_out,
                                              strategy=args.strategy)
    search = SearchParams(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    # The bar is closed before an error is printed, so the error stays the last line on stderr.
    with progress(len(texts), f"{args.src}->{args.tgt}") as bar, torch.inference_mode():
        out = translate(model, tok, texts, args.src, args.tgt, search, batch_size=args.batch_size,
                        progress=bar.update)
    # One output line per input line: a translation's own line breaks (\r, \n, U+2028...) become spaces.
    text = "".join(" ".join(line.splitlines()) + "\n" for line in out)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modlora", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=cli_rule(validate.POSITIVE),
                        help="torch CPU threads (default: 1 on the tiny preset, whose small matrices gain nothing "
                             "from more and lose several x on a busy machine; else torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="the model's shape, parameter count and a forward timing")
    _model_args(p)
    p.add_argument("--tokens", type=cli_rule(validate.POSITIVE), default=128,
                   help="sequence length of the timed forward")
    p.set_defaults(func=_info)

    p = sub.add_parser("translate", help="translate lines from stdin (or --input) with an adapter pair",
                       description="Translate one sentence per line, src -> tgt, with in[src] and out[tgt] "
                                   "from an adapter pool merged by --strategy.")
    _model_args(p)
    p.add_argument("--pool", help="adapter pool directory (lang/in, lang/out); without it the base model translates")
    p.add_argument("--src", required=True, help="source language code")
    p.add_argument("--tgt", required=True, help="target language code")
    p.add_argument("--strategy", choices=STRATEGIES, default="output",
                   help="output: merge the adapters' outputs; ab: merge their A and B (default: output)")
    p.add_argument("--w-in", type=cli_rule(validate.Rule(float)), default=0.5, help="weight of in[src] (default: 0.5)")
    p.add_argument("--w-out", type=cli_rule(validate.Rule(float)), default=0.5,
                   help="weight of out[tgt] (default: 0.5)")
    p.add_argument("--use", choices=("both", "in", "out"), default="both", help="which adapters of the pair")
    p.add_argument("--language-name", action="append", type=_language_name, metavar="CODE=NAME",
                   help="the English name the prompt gives a language modlora does not know (as the run's "
                        "[data] language_names), e.g. sw=Swahili; repeatable")
    p.add_argument("--weights", help="learned per-layer weights JSON (from learn-weights) instead of --w-in/--w-out")
    p.add_argument("--input", help="input file (default: stdin)")
    p.add_argument("--output", help="output file, written atomically (default: stdout)")
    p.add_argument("--num-beams", type=cli_type("eval", "num_beams"), default=5, help="beam width (default: 5)")
    p.add_argument("--batch-size", type=cli_type("eval", "batch_size"), default=16,
                   help="sentences per batch (default: 16)")
    p.add_argument("--max-new-tokens", type=cli_type("eval", "max_new_tokens"), default=256,
                   help="tokens generated at most per sentence (default: 256)")
    p.set_defaults(func=_translate)

    p = sub.add_parser("train-adapters", help="stage 1: train in[X] and out[X] for every language (resumes)")
    _pipeline_args(p)
    _train_args(p)
    p.add_argument("--rank", type=cli_type("lora", "rank"),
                   help="LoRA rank (default: ~0.5%% trainable parameters per adapter)")
    p.add_argument("--alpha", type=cli_type("lora", "alpha"), help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--dropout", type=cli_type("lora", "dropout"),
                   help="LoRA dropout on the adapters' input while training (default: 0)")
    _data_parallel_arg(p)
    p.set_defaults(func=_stage)

    p = sub.add_parser("train-full", help="stage 1b: the full-parameter fine-tuning baseline (resumes)",
                       description="Fine-tune every parameter of the base (fp32 master weights) on the union of "
                                   "the adapters' English-centric data; writes a Hugging Face checkpoint to "
                                   "OUT/full/model.")
    _pipeline_args(p)
    _train_args(p)
    _data_parallel_arg(p)
    p.set_defaults(func=_stage)

    p = sub.add_parser("learn-weights", help="stage 2: per-layer merge weights of every direction (resumes)")
    _pipeline_args(p)
    _train_args(p)
    _data_parallel_arg(p)
    p.set_defaults(func=_stage)

    p = sub.add_parser("evaluate", help="stage 3: chrF++ of every direction and configuration, then the table")
    _pipeline_args(p)
    _eval_args(p)
    p.set_defaults(func=_stage)

    p = sub.add_parser("table", help="stage 4: print (and write) the Table 1 layout from finished evaluations")
    _pipeline_args(p)
    p.add_argument("--compare-paper", nargs="?", type=cli_rule(validate.FILE), const=str(PAPER_TABLE), metavar="FILE",
                   help="also show our scores beside the paper's published Table 1 (default FILE: the shipped "
                        "modlora/assets/paper_table1.json) and write OUT/compare.md")
    p.set_defaults(func=_stage)

    p = sub.add_parser("run", help="the whole pipeline from a config; skips what is done",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _pipeline_args(p, config_positional=True)
    _train_args(p)
    _eval_args(p)
    _data_parallel_arg(p)
    p.set_defaults(func=_stage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nmodlora: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError, MemoryError) as e:
        # Bad input (a path, a file, a config, an adapter that does not fit): our errors name the
        # problem, so one line says it; MODLORA_DEBUG=1 shows the traceback.
        if os.environ.get("MODLORA_DEBUG"):
            raise
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e) or type(e).__name__
        log_stderr(f"modlora: error: {' '.join(message.split())}")  # one line, always
        return 2


if __name__ == "__main__":
    sys.exit(main())
