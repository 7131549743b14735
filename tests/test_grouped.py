"""q/k/v and gate/up as one op (modlora.adapted.pack/grouped, modlora.ops.grouped_linear): each
part's output lies within its float64 bound, the state dict and saved files are the unfused
model's, a model whose views were broken still computes the same function, and a decode step
makes 4 C++ calls per layer (plus the lm_head) instead of 7."""

from __future__ import annotations

import json

import pytest
import torch
from test_dispatch import _assert_logits_agree
from test_ops import CONFIG, assert_bounded, oracle, random_adapter

from modlora import adapted, cpu, dispatch, ops
from modlora.adapters import AdapterController
from modlora.generation import generate
from modlora.kernels import dual_lora_linear_ref, merge_pair, pairwise_lora_linear_ref
from modlora.kernels.reference import as_fp32
from modlora.loading import load_pretrained, random_model, save_pretrained

pytestmark = [pytest.mark.skipif(not cpu.HAVE_C, reason="modlora._C is not built (CI builds it)"),
              pytest.mark.usefixtures("one_thread")]
K, SIZES = 64, (48, 16, 16)


@pytest.fixture
def c_calls(monkeypatch):
    """Weight shapes of the C++ op's calls through ops, the path forced to C."""
    calls, real = [], cpu.lora_bank_linear
    monkeypatch.setattr(ops.cpu, "lora_bank_linear", lambda *a, **kw: calls.append(tuple(a[1].shape)) or real(*a, **kw))
    monkeypatch.setattr(dispatch, "choose", lambda kind, x, weight, run: "c")
    return calls


def _parts(dtype, mode: str, strategy: str, g: torch.Generator):
    """A fused weight [80, K] + bias and its three parts: no adapters, one pair on the first and
    last part (ranks 4 and 8, the middle one bare), or two pairs per row."""
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    weight, bias = rnd(sum(SIZES), K), rnd(sum(SIZES))
    ws, bs = weight.split(SIZES), bias.split(SIZES)
    r = 4 if strategy == "ab" else 8
    pair = lambda n: ((rnd(4, K), rnd(n, 4), 0.5), (rnd(r if strategy == "ab" else 4, K),
                                                  rnd(n, r if strategy == "ab" else 4), 2.0), 0.3, 0.7)
    pairs = {"none": [(), (), ()],
             "pair": [(pair(SIZES[0]),), (), (pair(SIZES[2]),)],
             "rows": [(pair(n), pair(n)) for n in SIZES]}[mode]
    rows = torch.tensor([1, 0, 1]) if mode == "rows" else None
    return weight, bias, [(w, b, p, strategy, rows) for w, b, p in zip(ws, bs, pairs, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,strategy", [("none", "output"), ("pair", "output"), ("pair", "ab"),
                                           ("rows", "output"), ("rows", "ab")])
@torch.no_grad()
def test_grouped_call_matches_float64_and_separate_calls(dtype, mode, strategy, c_calls):
    """One C++ call; each part within the bound of its own pairs merged as the bank holds them (fp32
    sums of K + R terms, R the group's total rank; in bf16 one rounding of the output). Without
    adapters the same kernel computes the same sums as the separate calls: bit-exact."""
    weight, bias, parts = _parts(dtype, mode, strategy, torch.Generator().manual_seed(len(mode) + len(strategy)))
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.grouped_linear(x, weight, bias, parts)
    assert c_calls == [(sum(SIZES), K)]
    separate = [ops._part(x, p, p[4]) for p in parts]
    assert len(c_calls) == 1 + len(parts)
    if mode == "none":
        assert all(torch.equal(a, b) for a, b in zip(got, separate, strict=True))
    u = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    bank = lambda pr: (*(t.to(dtype) for t in merge_pair(as_fp32(pr[0]), as_fp32(pr[1]), pr[2], pr[3], strategy)), 1.0)
    rank = sum(bank(pr)[0].shape[0] for p in parts for pr in p[2][:1])
    for y, (w, b, pairs, _, rows) in zip(got, parts, strict=True):
        assert y.shape == (3, w.shape[0]) and y.dtype == dtype
        if not pairs:
            exact, mag = oracle(torch.nn.functional.linear, x, w, b)
        elif rows is None:
            exact, mag = oracle(dual_lora_linear_ref, x, w, b, bank(pairs[0]), None)
        else:
            merged = [(bank(pr), None, 1.0, 1.0) for pr in pairs]
            exact, mag = oracle(pairwise_lora_linear_ref, x, w, b, merged, rows, strategy)
        assert_bounded(y, exact, mag, n=K + rank + 2, u_out=u)


@torch.no_grad()
def test_grouped_bank_follows_in_place_updates(c_calls):
    weight, bias, parts = _parts(torch.float32, "pair", "output", torch.Generator().manual_seed(0))
    x = torch.randn(2, K)
    before = ops.grouped_linear(x, weight, bias, parts)[0]
    parts[0][2][0][0][1].mul_(2)  # B of the first part's lora_in
    after = ops.grouped_linear(x, weight, bias, parts)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ops._part(x, parts[0], None), rtol=1e-5, atol=1e-5)


def _model(dtype=torch.float32, mode="pair"):
    """A small model with an `output` pair bound, or two pairs routed per row (one per sentence)."""
    model = random_model(CONFIG, seed=1, dtype=dtype)
    ctl = AdapterController(model)
    a = [random_adapter(model, 4, s, role) for s, role in ((1, "in"), (2, "out"), (3, "in"), (4, "out"))]
    if mode == "pair":
        ctl.set_adapters(a[0], a[1], w_in=0.3, w_out=0.7, strategy="output")
    else:
        ctl.set_adapter_pairs([(a[0], a[1], 0.3, 0.7), (a[2], a[3], 0.6, 0.4)], strategy="output")
    return model, ctl


def _unfuse(model):
    """Every parameter in a storage of its own, values unchanged (as after a user's dtype round
    trip, which in bf16 would also round the fp32 rotary buffer)."""
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def _logits(model, ids, ctl=None):
    if ctl is not None and ctl.row_pair is not None:
        ctl.route_rows(torch.arange(ids.shape[0]) % 2)
    cache = model.new_cache(ids.shape[0], ids.shape[1], max_new_tokens=2, num_beams=1)
    return torch.stack((model.prefill(ids, None, cache), model.decode_step(ids[:, 0], cache))).float()


def test_state_dict_and_saved_file_are_the_unfused_models(tmp_path):
    fused = random_model(CONFIG, seed=1)
    assert fused.model.layers[0].self_attn.k_proj.weight.untyped_storage().data_ptr() == \
        fused.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    plain = random_model(CONFIG, seed=1)
    for lin in plain.adapted_linears().values():  # each parameter in a storage of its own, as before
        lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    a, b = fused.state_dict(), plain.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].shape == b[k].shape for k in a)
    save_pretrained(fused, tmp_path / "fused")
    save_pretrained(plain, tmp_path / "plain")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "fused" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    again = load_pretrained(tmp_path / "fused")
    assert all(torch.equal(v, a[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pair", "rows"])
@torch.no_grad()
def test_decode_step_makes_four_calls_per_layer_and_the_same_logits(dtype, mode, c_calls):
    model, ctl = _model(dtype, mode)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    ctl.route_rows(torch.tensor([0, 1])) if mode == "rows" else None
    cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
    model.prefill(ids, None, cache)
    c_calls.clear()
    fused = model.decode_step(ids[:, 0], cache).float()
    assert len(c_calls) == 4 * CONFIG.num_hidden_layers + 1
    _unfuse(model)
    cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
    model.prefill(ids, None, cache)
    c_calls.clear()
    plain = model.decode_step(ids[:, 0], cache).float()
    assert len(c_calls) == 7 * CONFIG.num_hidden_layers + 1
    _assert_logits_agree(fused, plain, dtype)
    model.pack_weights()  # regroups the parameters as they are now
    cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
    model.prefill(ids, None, cache)
    c_calls.clear()
    assert torch.equal(model.decode_step(ids[:, 0], cache).float(), fused)
    assert len(c_calls) == 4 * CONFIG.num_hidden_layers + 1


@torch.no_grad()
def test_broken_views_still_give_the_right_logits():
    """A dtype round trip or load_state_dict(assign=True) gives every parameter its own storage:
    the layers then run separately, with the same logits; a plain load_state_dict copies in place
    and keeps the group."""
    model, _ctl = _model()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    want = _logits(model, ids)
    model.to(torch.float64).to(torch.float32)
    mlp = model.model.layers[0].mlp
    assert adapted._adjacent([mlp.gate_proj.weight, mlp.up_proj.weight]) is None  # the round trip broke the views
    _assert_logits_agree(_logits(model, ids), want, torch.float32)
    other, _ctl2 = _model()
    other.load_state_dict(random_model(CONFIG, seed=5).state_dict(), assign=True)
    want = _logits(other, ids)
    model.load_state_dict(other.state_dict())
    _assert_logits_agree(_logits(model, ids), want, torch.float32)
    assert not torch.allclose(want, _logits(_model()[0], ids))  # seed 5's weights differ from seed 1's


@pytest.mark.parametrize("mode", ["pair", "rows"])
@torch.no_grad()
def test_beam_search_is_the_unfused_models(mode):
    model, ctl = _model(torch.float32, mode)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=3, max_new_tokens=8, eos_token_id=[CONFIG.vocab_size - 1], pad_token_id=0)
    if mode == "rows":
        kw.update(row_pair=torch.tensor([0, 1]), adapters=ctl)
    fused = generate(model, ids, **kw)
    _unfuse(model)
    assert torch.equal(fused, generate(model, ids, **kw))


def test_autograd_runs_the_parts_as_before(c_calls):
    """With a trainable tensor in layer 0's k_proj the group runs its parts separately, each as it
    would alone: q and v (frozen, input without a graph) on the C++ path, k and everything after it
    on the differentiable one; the gradient is the unfused model's."""
    grads = []
    for fused in (True, False):
        model = random_model(CONFIG, seed=1)
        if not fused:
            _unfuse(model)
        adapter = random_adapter(model, 4, 1, "in")
        A = adapter.tensors["model.layers.0.self_attn.k_proj"][0].requires_grad_()
        AdapterController(model).set_adapters(lora_in=adapter, w_in=1.0)
        c_calls.clear()
        model(torch.randint(0, CONFIG.vocab_size, (1, 3), generator=torch.Generator().manual_seed(0))).sum().backward()
        assert c_calls == [(96, 96), (32, 96)]
        grads.append(A.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_tensors_adjacent_in_memory_but_in_two_storages_are_not_a_group():
    memory = bytearray(4 * 8 * 4)
    a = torch.frombuffer(memory, dtype=torch.float32, count=16).view(4, 4)
    b = torch.frombuffer(memory, dtype=torch.float32, count=16, offset=64).view(4, 4)
    assert b.data_ptr() == a.data_ptr() + 64 and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert adapted._adjacent([a, b]) is None
    whole = torch.zeros(8, 4)
    assert torch.equal(adapted._adjacent([whole[:4], whole[4:]]), whole)


def test_blocks_of_another_width_are_not_a_group():
    whole = torch.zeros(24)
    assert adapted._adjacent([whole[:8].view(2, 4), whole[8:].view(2, 8)]) is None


@torch.no_grad()
def test_a_group_where_only_some_linears_have_a_bias_keeps_every_bias():
    torch.manual_seed(0)
    linears = [adapted.AdaptedLinear(8, 4, bias=b) for b in (False, True, True)]
    for lin in linears[1:]:
        lin.bias.normal_()
    adapted.pack([linears])
    x = torch.randn(3, 8)
    for got, lin in zip(adapted.grouped(x, linears), linears, strict=True):
        assert torch.equal(got, lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("calibrating")
@torch.no_grad()
def test_calibrated_group_takes_a_measured_path_with_the_same_logits(dtype, monkeypatch):
    """Calibration on: each group's case is timed (every C++ ISA grouped, and the separate calls,
    "torch") and cached; whichever wins, the logits are those of every linear on torch's path."""
    model, _ctl = _model(dtype)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    got = _logits(model, ids)
    choices = json.loads(dispatch.cache_file().read_text())["choices"]
    groups = {name: e for name, e in choices.items() if name.startswith("group-lora|")}
    assert {name.split("|")[1] for name in groups} == {"160", "400"}  # q/k/v 96+32+32, gate/up 2x200
    for entry in groups.values():
        assert set(entry["ms"]) == {*dispatch.c_paths(dtype, dtype), "torch"}
        assert entry["path"] == min(entry["ms"], key=entry["ms"].get)
    monkeypatch.setenv("MODLORA_DISPATCH", "torch")
    dispatch.reset()
    _assert_logits_agree(got, _logits(model, ids), dtype)


@torch.no_grad()
def test_a_path_naming_an_isa_runs_the_group_as_one_call(monkeypatch):
    calls, real = [], cpu.lora_bank_linear
    monkeypatch.setattr(ops.cpu, "lora_bank_linear", lambda *a, **kw: calls.append(kw.get("isa")) or real(*a, **kw))
    isa = cpu._C.supported_isas()[-1]
    monkeypatch.setenv("MODLORA_DISPATCH", f"c:{isa}")
    dispatch.reset()
    try:
        model, _ctl = _model(torch.bfloat16)
        ids = torch.randint(0, CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
        cache = model.new_cache(2, 5, max_new_tokens=2, num_beams=1)
        model.prefill(ids, None, cache)
        calls.clear()
        model.decode_step(ids[:, 0], cache)
        assert calls == [isa] * (4 * CONFIG.num_hidden_layers + 1)
    finally:
        monkeypatch.undo()
        dispatch.reset()
