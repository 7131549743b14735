"""The trainer: loss and gradients against transformers + peft, learning, exact resume, frozen base."""

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


def test_ctrl_c_inside_a_step_keeps_the_finished_steps(tmp_path, monkeypatch):
    """Interrupted in the 8th micro-batch (the 2nd of step 4 of 6; the last scheduled checkpoint is step 2):
    the save on interrupt keeps step 3, and the resumed run equals the uninterrupted one."""
    from modlora import train as train_module

    straight, full = _train_once(tmp_path / "a")
    real, calls = train_module.completion_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "completion_loss", interrupted)
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
