"""The trainer: loss and gradients against transformers + peft, learning, exact resume, frozen base."""

import dataclasses
import json

import pytest
import torch
from hf_reference import hf_model, save_hf

from modlora import checkpoint
from modlora.adapters import TARGET_MODULES, AdapterController, LoraAdapter
from modlora.config import Qwen2Config
from modlora.evaluate import chrf_pp
from modlora.generation import translate
from modlora.kernels import linear_cross_entropy
from modlora.loading import load_pretrained, random_model
from modlora.model import Qwen2ForCausalLM
from modlora.tokenizer import Tokenizer
from modlora.train import (
    LoraConfig,
    TrainConfig,
    bucketed_batches,
    collate,
    completion_loss,
    learn_weights,
    paper_rank,
    shared_prefix_length,
    train,
    train_adapter,
)

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_examples(n: int, seed: int, vocab: int = 1000, shared: int = 0) -> list[tuple[list[int], list[int]]]:
    """Token sequences of different lengths; the first half of each is a masked "prompt" whose
    first ``shared`` tokens are the same in every example (as the chat system prompt is)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, vocab, (shared,), generator=g).tolist()
    out = []
    for _ in range(n):
        length = int(torch.randint(2 * shared + 6, 2 * shared + 20, (1,), generator=g))
        ids = prefix + torch.randint(1, vocab, (length - shared,), generator=g).tolist()
        prompt = length // 2
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return out


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    hf = hf_model(tie=True, seed=3)
    path = save_hf(hf, tmp_path_factory.mktemp("ckpt"))
    return hf, load_pretrained(path, dtype=torch.float32)


def test_one_step_loss_and_gradients_match_peft(hf_pair):
    import peft

    hf, ours = hf_pair
    adapter = LoraAdapter.init(ours, rank=4, alpha=8, seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # nonzero B so that every A gets a gradient too
        for _, B in adapter.tensors.values():
            B.copy_(torch.randn(B.shape, generator=g) * 0.05)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGET_MODULES),
                                                  lora_dropout=0.0))
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, (A, B) in adapter.tensors.items():
            module = modules[f"base_model.model.{name}"]
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)

    ids, attn, mask = collate(_random_examples(4, seed=0, shared=5), PAD)
    assert shared_prefix_length(ids, attn, mask) == 5  # the shared-prefix path is the one compared
    ctl = AdapterController(ours)
    ctl.set_adapters(lora_in=adapter, w_in=1.0)
    try:
        loss_sum, n = completion_loss(ours, ids, attn, mask, chunk=7)  # chunk < trained tokens: several chunks
        loss = loss_sum / n
        loss.backward()
        grads = {name: (A.grad.clone(), B.grad.clone()) for name, (A, B) in adapter.tensors.items()}
        for A, B in adapter.tensors.values():
            A.grad = B.grad = None
        plain_sum, plain_n = completion_loss(ours, ids, attn, mask, share_prefix=False)
        (plain_sum / plain_n).backward()
    finally:
        ctl.clear()
    labels = ids.masked_fill(mask == 0, -100)  # transformers shifts the labels itself
    expected = ref(input_ids=ids, attention_mask=attn, labels=labels).loss
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain_sum / plain_n, expected, rtol=1e-5, atol=1e-6)
    for name, (A, B) in adapter.tensors.items():
        module = modules[f"base_model.model.{name}"]
        theirs = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
        for shared_grad, plain_grad, ref_grad in zip(grads[name], (A.grad, B.grad), theirs, strict=True):
            torch.testing.assert_close(shared_grad, ref_grad, rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(plain_grad, ref_grad, rtol=1e-4, atol=1e-7, msg=name)


def test_chunked_cross_entropy_equals_full_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (37,), generator=g)
    got = linear_cross_entropy(h, w, targets, chunk=5)
    (grad,) = torch.autograd.grad(got * 0.5, h)
    expected = torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected * 0.5, h)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_chunked_cross_entropy_under_no_grad_computes_no_gradients():
    """Inside an autograd.Function's forward grad mode is always off, and needs_input_grad says only
    what requires grad: under no_grad the loss alone runs (no dh GEMM, no [V, C] fp32 dW)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (37,), generator=g)
    counted = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad), Calls() as calls:
            loss = linear_cross_entropy(h, w, targets, chunk=5)
        counted[grad] = [calls.names.count(op) for op in ("aten.mm.default", "aten.addmm_.default")]
        assert loss.requires_grad is grad
    chunks = 8
    assert counted == {False: [chunks, 0], True: [2 * chunks, chunks]}
    expected = torch.nn.functional.cross_entropy(h.detach() @ w.detach().t(), targets, reduction="sum")
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("edit,message", [
    (lambda h, w, t: (h, w, t[:-1]), r"targets must be int64 or int32 \[37\] \(one per row of h\)"),
    (lambda h, w, t: (h, w, t.float()), r"targets must be int64 or int32 \[37\]"),
    (lambda h, w, t: (h, w, t.to(torch.uint8)), r"targets must be int64 or int32 \[37\]"),
    (lambda h, w, t: (h, w[:, :8], t), r"h must be \[N, C\] and weight \[V, C\], got \(37, 16\) and \(300, 8\)"),
    (lambda h, w, t: (h, w, t + 299), r"targets must lie in \[0, 300\)"),
    (lambda h, w, t: (h, w, t, 0), "chunk must be a positive integer, got 0"),
    (lambda h, w, t: (h, w, t, -1), "chunk must be a positive integer, got -1"),
])
def test_chunked_cross_entropy_names_malformed_arguments(edit, message):
    """Shorter targets than rows summed fewer losses, and chunk <= 0 returned 0, both silently."""
    g = torch.Generator().manual_seed(0)
    h, w, targets = torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g), torch.randint(0, 300, (37,))
    with pytest.raises((ValueError, IndexError), match=message):
        linear_cross_entropy(*edit(h, w, targets))


def test_buckets_cover_every_example_once_with_little_padding():
    lengths = torch.randint(5, 200, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = bucketed_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)
    assert batches != bucketed_batches(lengths, 8, seed=2)  # a new order every epoch


def test_paper_rank_of_qwen25_05b_shape():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config.preset("qwen2.5-0.5b"))
    assert paper_rank(model) == 4  # 549,888 LoRA parameters per rank vs 494M base: 0.45%


def _small_model(seed: int = 0) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    return random_model(cfg, seed=seed)


def _train_once(tmp, stop_after=None, model=None):
    model = model or _small_model()
    # Dropout: the resumed run must restore the RNG state, not only the weights and the optimizer.
    adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0, dropout=0.1)
    ctl = AdapterController(model)
    ctl.set_adapters(lora_in=adapter, w_in=1.0)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=3, grad_accum=2, warmup_ratio=0.2, checkpoint_every=2)
    result = train(model, adapter.parameters(), _random_examples(17, seed=1), cfg, tmp, pad_id=PAD,
                   stop_after=stop_after, log=lambda _: None)
    ctl.clear()
    return adapter, result


def _interrupting(real, at: int):
    """``real``, but its ``at``-th call raises KeyboardInterrupt (Ctrl-C there); ``.calls`` counts them."""
    def wrapper(*args, **kwargs):
        wrapper.calls.append(1)
        if len(wrapper.calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    wrapper.calls = []
    return wrapper


def test_ctrl_c_inside_a_step_keeps_the_finished_steps(tmp_path, monkeypatch):
    """Interrupted in the 8th micro-batch (the 2nd of step 4 of 6; the last scheduled checkpoint is step 2):
    the save on interrupt keeps step 3, and the resumed run equals the uninterrupted one."""
    from modlora import train as train_module

    straight, full = _train_once(tmp_path / "a")
    real = train_module.completion_loss
    monkeypatch.setattr(train_module, "completion_loss", _interrupting(real, at=8))
    with pytest.raises(KeyboardInterrupt):
        _train_once(tmp_path / "b")
    assert checkpoint.load(tmp_path / "b" / checkpoint.FILE, torch.device("cpu"))["step"] == 3
    monkeypatch.setattr(train_module, "completion_loss", real)
    torch.manual_seed(99)
    resumed, rest = _train_once(tmp_path / "b")
    assert rest["done"] and rest["losses"] == full["losses"][3:]
    for name, (A, B) in straight.tensors.items():
        assert torch.equal(A, resumed.tensors[name][0]) and torch.equal(B, resumed.tensors[name][1]), name


def test_resume_with_other_settings_names_what_changed(tmp_path):
    model = _small_model()
    adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0)
    AdapterController(model).set_adapters(lora_in=adapter, w_in=1.0)
    data = _random_examples(6, seed=1)
    run = lambda lr: train(model, adapter.parameters(), data, TrainConfig(epochs=2, lr=lr, batch_size=3, grad_accum=1),
                           tmp_path, pad_id=PAD, stop_after=1, log=lambda _: None)
    run(1e-2)
    with pytest.raises(ValueError, match=r"different run configuration \(lr 0.01 -> 0.02\)"):
        run(2e-2)


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    straight, full = _train_once(tmp_path / "a")
    first, part = _train_once(tmp_path / "b", stop_after=2)  # inside the first epoch (3 steps each)
    assert not part["done"] and part["step"] == 2
    torch.manual_seed(1234)  # as a new process would: the RNG state must come from the checkpoint
    resumed, rest = _train_once(tmp_path / "b")
    assert rest["done"] and rest["step"] == full["step"] == 6  # 17 examples: 6 batches of 3, 2 per step, 2 epochs
    assert part["losses"] + rest["losses"] == full["losses"]
    for name, (A, B) in straight.tensors.items():
        assert torch.equal(A, resumed.tensors[name][0]) and torch.equal(B, resumed.tensors[name][1]), name
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [r["loss"] for r in log] == full["losses"]


def test_base_weights_untouched_and_only_adapter_trains(tmp_path):
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, result = _train_once(tmp_path, model=model)
    assert result["losses"][-1] < result["losses"][0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    assert any(B.abs().sum() > 0 for _, B in adapter.tensors.values())


def test_weight_learning_trains_theta_only(tmp_path):
    model = _small_model()
    lora_in, lora_out = (LoraAdapter.init(model, rank=4, alpha=8, seed=s, language="fr", role=r)
                         for s, r in ((1, "in"), (2, "out")))
    with torch.no_grad():
        for a in (lora_in, lora_out):
            for _, B in a.tensors.values():
                B.normal_(0, 0.1)
    frozen = [t.clone() for t in (*lora_in.parameters(), *lora_out.parameters())]

    class _Tok:  # the small model's vocabulary is not Qwen's: a stand-in with the needed ids
        pad_id = PAD

    import modlora.train as train_module

    examples = _random_examples(8, seed=2)
    original = train_module.training_example
    train_module.training_example = lambda tok, src, tgt, s, t: examples[int(s)]
    try:
        weights = learn_weights(AdapterController(model), _Tok(), lora_in, lora_out, "fr", "de",
                                [(str(i), "") for i in range(8)], "output",
                                TrainConfig(epochs=2, lr=0.1, batch_size=4, grad_accum=1), tmp_path).pairs()
    finally:
        train_module.training_example = original
    assert len(weights) == 2 and all(abs(a + b - 1) < 1e-6 for a, b in weights)
    assert any(abs(b - 0.5) > 1e-3 for _, b in weights)  # theta moved
    assert all(torch.equal(a, b) for a, b in zip(frozen, (*lora_in.parameters(), *lora_out.parameters()), strict=True))
    saved = json.loads((tmp_path / "weights.json").read_text())
    assert saved["strategy"] == "output" and saved["w_out"] == pytest.approx([b for _, b in weights])


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digit_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        ds = torch.randint(0, 10, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        pairs.append((" ".join(map(str, ds)), " ".join(DIGITS[d] for d in ds)))
    return pairs


def test_tiny_model_learns_a_synthetic_task(tmp_path):
    """Digits -> number words: the loss falls and chrF++ of the trained adapter beats the untrained model."""
    tok = Tokenizer.default()
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    model = random_model(cfg, seed=0)
    with torch.no_grad():
        # At HF's init scale (std 0.02) the frozen output layer caps a logit's margin near 1: no adapter
        # could make the next token likely. A trained model's head is far from that; scale it up.
        model.lm_head.weight.mul_(10)
    train_pairs, test_pairs = _digit_pairs(48, seed=0), _digit_pairs(8, seed=1)
    sources, refs = [s for s, _ in test_pairs], [t for _, t in test_pairs]

    def score() -> float:
        with torch.inference_mode():
            hyps = translate(model, tok, sources, "en", "fr", num_beams=1, max_new_tokens=12, batch_size=8)
        return chrf_pp(hyps, refs)["score"]

    untrained = score()
    ctl = AdapterController(model)
    adapter = train_adapter(ctl, tok, "fr", "out", "en", "fr", train_pairs, LoraConfig(rank=16, alpha=32),
                            TrainConfig(epochs=8, lr=1e-2, batch_size=8, grad_accum=1, warmup_ratio=0.1),
                            tmp_path, log=lambda _: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # measured: 13.0 -> 7.1
    ctl.set_adapters(lora_out=adapter, w_out=1.0)
    trained = score()
    assert trained > untrained + 5, (untrained, trained)  # measured: 6.5 -> 13.6


def _adapter_run(tmp, data, cfg=None, **kw):
    """One adapter of the small model trained on ``data`` in ``tmp`` (stop_after=1 unless given)."""
    model = _small_model()
    adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0)
    AdapterController(model).set_adapters(lora_in=adapter, w_in=1.0)
    cfg = cfg or TrainConfig(epochs=2, lr=1e-2, batch_size=3, grad_accum=1)
    kw.setdefault("stop_after", 1)
    kw.setdefault("pad_id", PAD)
    return train(model, adapter.parameters(), data, cfg, tmp, log=lambda _: None, **kw)


def test_resume_refuses_other_data_and_other_records(tmp_path):
    """Data of the same lengths (the same batches) but other tokens, another pad id, or another
    caller's record (the LoRA settings) is another run: its checkpoint is not resumed."""
    data = _random_examples(6, seed=1)
    _adapter_run(tmp_path, data, record={"lora": {"alpha": 8}})
    other = [([t % 999 + 1 for t in ids], mask) for ids, mask in data]
    with pytest.raises(ValueError, match="different run configuration.*examples_sha256"):
        _adapter_run(tmp_path, other, record={"lora": {"alpha": 8}})
    with pytest.raises(ValueError, match=r"different run configuration \(lora \{'alpha': 8\} -> \{'alpha': 64\}\)"):
        _adapter_run(tmp_path, data, record={"lora": {"alpha": 64}})
    with pytest.raises(ValueError, match=r"different run configuration \(pad_id 0 -> 1\)"):
        _adapter_run(tmp_path, data, record={"lora": {"alpha": 8}}, pad_id=1)
    assert _adapter_run(tmp_path, data, record={"lora": {"alpha": 8}})["step"] == 2


def test_train_adapter_resume_refuses_other_lora_settings(tmp_path):
    model = _small_model()

    class _Tok:
        pad_id = PAD

    import modlora.train as train_module

    examples = _random_examples(6, seed=2)
    original = train_module.training_example
    train_module.training_example = lambda tok, src, tgt, s, t: examples[int(s)]
    run = lambda alpha: train_adapter(AdapterController(model), _Tok(), "fr", "in", "fr", "en",
                                      [(str(i), "") for i in range(6)], LoraConfig(rank=2, alpha=alpha),
                                      TrainConfig(epochs=2, batch_size=3, grad_accum=1), tmp_path, stop_after=1,
                                      log=lambda _: None)
    try:
        assert run(4.0) is None  # stopped after a step
        with pytest.raises(ValueError, match=r"different run configuration \(lora .*'alpha': 4\.0.*'alpha': 64\.0"):
            run(64.0)
        assert run(4.0) is None and json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    finally:
        train_module.training_example = original


@pytest.mark.parametrize("example,message", [
    (([1, 2, 3], [0, 1]), "example 1 must be \\(token ids, loss mask\\), two lists of one length"),
    (([1, 2, 3], [0, 1, 1, 1]), "example 1 must be"),
    (([1.0, 2, 3], [0, 1, 1]), "example 1: token ids must be integers"),
    (([1, True, 3], [0, 1, 1]), "example 1: token ids must be integers"),
    (([1, 2, 3], [0, 2, 1]), "example 1: the loss mask must hold 0 and 1 only"),
    (([1, 2, 3], [0, 0.5, 1]), "example 1: the loss mask must hold 0 and 1 only"),
    (([1, 2, 3], [1, 0, 0]), "example 1 trains no token"),
    (([], []), "example 1 trains no token"),
    ([1, 2, 3], "example 1 must be"),
])
def test_malformed_examples_are_refused_by_index(tmp_path, example, message):
    with pytest.raises(ValueError, match=message):
        _adapter_run(tmp_path, [([5, 6, 7], [0, 1, 1]), example])


@pytest.mark.parametrize("field,value,message", [
    ("checkpoint_every", 0, "TrainConfig.checkpoint_every must be a positive integer"),
    ("grad_accum", 0, "TrainConfig.grad_accum must be a positive integer"),
    ("epochs", 0, "TrainConfig.epochs must be a positive integer"),
    ("lr", float("nan"), "TrainConfig.lr must be a finite number"),
    ("warmup_ratio", 1.5, r"TrainConfig.warmup_ratio must be in \[0, 1\]"),
])
def test_bad_train_config_is_refused_before_training(tmp_path, field, value, message):
    cfg = dataclasses.replace(TrainConfig(batch_size=3, grad_accum=1), **{field: value})
    with pytest.raises(ValueError, match=message):
        _adapter_run(tmp_path, _random_examples(6, seed=1), cfg)
    assert not (tmp_path / checkpoint.FILE).exists()


def test_train_config_fields_all_have_rules():
    from modlora.validate import SETTINGS

    assert set(SETTINGS["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_ctrl_c_while_the_checkpoint_is_written_saves_it_again(tmp_path, monkeypatch):
    """An interrupt inside the checkpoint write of step 1 leaves no file; the interrupt handler must
    then write step 1 (it did not when the step was marked saved before the write)."""
    save = _interrupting(checkpoint.save, at=1)
    monkeypatch.setattr(checkpoint, "save", save)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=3, grad_accum=1, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        _adapter_run(tmp_path, _random_examples(6, seed=1), cfg, stop_after=None)
    assert len(save.calls) == 2
    assert checkpoint.load(tmp_path / checkpoint.FILE, torch.device("cpu"))["step"] == 1


def test_a_killed_save_leaves_no_temp_file_after_the_next(tmp_path):
    """A kill amid a checkpoint write (no cleanup runs) leaves `.checkpoint.safetensors.<hex>`, or
    safetensors' own `.tmp<6 characters>` inside it, as large as the checkpoint: the next save removes
    them, and nothing else."""
    stale = [tmp_path / f".{checkpoint.FILE}.0123abcd", tmp_path / ".tmpAb12Cd"]
    other = [tmp_path / f".{checkpoint.FILE}.notours", tmp_path / ".tmpAb12Cde", tmp_path / "tmpAb12Cd"]
    for path in stale + other:
        path.write_bytes(b"x" * 100)
    _adapter_run(tmp_path, _random_examples(6, seed=1))
    assert not any(p.exists() for p in stale)
    kept = [checkpoint.FILE, "log.jsonl", *(o.name for o in other)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_grad_accumulation_equals_one_larger_batch(tmp_path):
    """A step of k micro-batches has the loss and the update of one batch k times larger: the loss
    is the mean over all trained tokens of the step, not a mean of micro-batch means."""
    data = _random_examples(8, seed=4)  # one step either way: every example in it
    assert len(set(sum(m[1:]) for _, m in data)) > 1  # unequal token counts: the two means differ
    results = []
    for batch, accum in ((4, 2), (8, 1)):
        model = _small_model()
        adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0)
        with torch.no_grad():
            for _, B in adapter.tensors.values():
                B.normal_(0, 0.1)
        AdapterController(model).set_adapters(lora_in=adapter, w_in=1.0)
        cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=batch, grad_accum=accum, warmup_ratio=0.0)
        result = train(model, adapter.parameters(), data, cfg, tmp_path / str(batch), pad_id=PAD,
                       log=lambda _: None)
        results.append((result["losses"], [t.clone() for t in adapter.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_learning_rate_per_step_follows_transformers_linear_schedule(tmp_path):
    """The logged lr of each step is transformers' get_linear_schedule_with_warmup (warmup from 0)."""
    import transformers

    _train_once(tmp_path)  # 6 steps, warmup_ratio 0.2: 1 warmup step
    logged = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert logged == pytest.approx(expected, rel=1e-12, abs=0) and expected[0] == 0 and expected[1] == 1e-2


def test_resume_refuses_another_data_order(tmp_path, monkeypatch):
    import modlora.train as train_module

    _train_once(tmp_path, stop_after=2)
    real = train_module.bucketed_batches
    monkeypatch.setattr(train_module, "bucketed_batches", lambda *a, **k: real(*a, **k)[::-1])
    with pytest.raises(ValueError, match="the data order differs from the checkpoint's"):
        _train_once(tmp_path)


def test_an_unfrozen_base_is_refused(tmp_path):
    model = _small_model()
    model.model.norm.weight.requires_grad_(True)
    adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0)
    with pytest.raises(ValueError, match=r"base model parameters must be frozen"):
        train(model, adapter.parameters(), _random_examples(6, seed=1), TrainConfig(), tmp_path, pad_id=PAD)


def test_a_base_weight_written_during_training_is_an_error(tmp_path, monkeypatch):
    import modlora.train as train_module

    model = _small_model()
    real = train_module.completion_loss

    def writes_base(*args, **kwargs):
        with torch.no_grad():
            model.model.norm.weight.mul_(1.0)  # an in-place write, even of the same values
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "completion_loss", writes_base)
    with pytest.raises(RuntimeError, match="the base model's weights changed during training"):
        _train_once(tmp_path, model=model)


def test_a_prompt_shared_by_every_row_runs_once_with_the_same_loss():
    """All rows share their whole prompt: the shared prefix stops one token before the first trained
    one (that position predicts it), and the loss equals the unshared forward's."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, 1000, (7,), generator=g).tolist()
    examples = [(prompt + torch.randint(1, 1000, (n,), generator=g).tolist(), [0] * 7 + [1] * n) for n in (3, 5, 4)]
    ids, attn, mask = collate(examples, PAD)
    assert shared_prefix_length(ids, attn, mask) == 6
    model = _small_model()
    shared = completion_loss(model, ids, attn, mask, share_prefix=True)
    plain = completion_loss(model, ids, attn, mask, share_prefix=False)
    assert shared[1] == plain[1] == 12
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)


def test_weight_decay_applies_to_matrices_only(tmp_path):
    """AdamW's decay goes to the LoRA matrices; 1-D parameters (a bias, a norm) get none."""
    from modlora.train import setup

    model = _small_model()
    adapter = LoraAdapter.init(model, rank=4, alpha=8, seed=0)
    vector = torch.nn.Parameter(torch.zeros(3))
    run = setup(model, [*adapter.parameters(), vector], _random_examples(6, seed=1),
                TrainConfig(weight_decay=0.1), tmp_path, PAD)
    decay, no_decay = run.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in adapter.parameters()}
    assert [id(p) for p in no_decay["params"]] == [id(vector)]


def test_checkpoints_come_every_so_many_minutes_too(tmp_path, monkeypatch):
    """Besides every `checkpoint_every` steps, a checkpoint once `checkpoint_minutes` have passed
    (here a clock that moves 10 minutes a reading: due at every second step); and neither setting is
    part of what a resume must match."""
    import modlora.train as train_module

    clock = iter(range(0, 10**6, 600))
    monkeypatch.setattr(train_module.time, "monotonic", lambda: next(clock))
    real, steps = checkpoint.save, []
    monkeypatch.setattr(checkpoint, "save", lambda path, state: steps.append(state["step"]) or real(path, state))
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=3, grad_accum=1, checkpoint_every=100, checkpoint_minutes=15)
    _adapter_run(tmp_path, _random_examples(9, seed=1), cfg, stop_after=5)
    assert steps == [2, 4, 5]  # 5: stop_after
    again = dataclasses.replace(cfg, checkpoint_every=1, checkpoint_minutes=1.0)
    assert _adapter_run(tmp_path, _random_examples(9, seed=1), again, stop_after=None)["step"] == 6


def test_tensors_digest_sees_values_dtypes_and_shapes():
    from modlora.train import tensors_digest

    t = torch.arange(6.0).reshape(2, 3)
    same = tensors_digest([t, t.t()])
    assert tensors_digest([t.clone(), t.t().clone()]) == same  # values, not storage or strides
    changed = t.clone()
    changed[1, 2] += 1e-6
    for other in ([changed, t.t()], [t.double(), t.t()], [t.reshape(3, 2), t.t()], [t]):
        assert tensors_digest(other) != same


def test_weight_learning_resumes_only_on_the_same_frozen_adapters(tmp_path):
    model = _small_model()
    make = lambda seed, role: LoraAdapter.init(model, rank=4, alpha=8, seed=seed, language="fr", role=role)
    lora_in, lora_out, other_in = make(1, "in"), make(2, "out"), make(3, "in")
    for a in (lora_in, lora_out, other_in):
        with torch.no_grad():
            for _, B in a.tensors.values():
                B.normal_(0, 0.1)

    class _Tok:
        pad_id = PAD

    import modlora.train as train_module

    examples = _random_examples(8, seed=2)
    original = train_module.training_example
    train_module.training_example = lambda tok, src, tgt, s, t: examples[int(s)]
    run = lambda a_in: learn_weights(AdapterController(model), _Tok(), a_in, lora_out, "fr", "de",
                                     [(str(i), "") for i in range(8)], "output",
                                     TrainConfig(epochs=2, lr=0.1, batch_size=4, grad_accum=1), tmp_path,
                                     stop_after=1, log=lambda _: None)
    try:
        assert run(lora_in) is None
        with pytest.raises(ValueError, match=r"different run configuration \(lora_in \["):
            run(other_in)
        assert run(lora_in) is None  # the same adapters: resumed to step 2
        assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    finally:
        train_module.training_example = original
