"""Adapters against peft on transformers.Qwen2ForCausalLM with the same random weights (fp32, CPU)."""

import copy
import json
import shutil

import pytest
import torch
from hf_reference import SMALL, hf_model, save_hf
from safetensors.torch import load_file, save_file

import modlora.adapters.controller as controller_mod
from modlora import ops
from modlora.adapters import AdapterController, AdapterError, LearnedWeights, LoraAdapter, export_pair
from modlora.adapters.format import SIDECAR_FILE, TARGET_MODULES
from modlora.adapters.merge import fold_into
from modlora.config import Qwen2Config
from modlora.loading import load_pretrained, random_model
from modlora.pool import AdapterPool

# fp32 on CPU: the same math in a different op order (PEFT adds each adapter's output separately).
FP32 = dict(rtol=1e-5, atol=1e-5)
# Gradients sum over every token and layer: a little more rounding than logits.
GRAD = dict(rtol=1e-4, atol=1e-6)
L = 3  # layers of hf_reference.SMALL


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = hf_model(seed=0)
    path = save_hf(hf, tmp_path_factory.mktemp("ckpt"))
    return hf, path


@pytest.fixture
def hf(base):
    return copy.deepcopy(base[0])  # peft wraps the model in place: a fresh copy per test


@pytest.fixture
def ours(base):
    return load_pretrained(base[1], dtype=torch.float32)


@pytest.fixture
def ctl(ours):
    return AdapterController(ours)


def ids(batch=2, t=9, seed=0):
    return torch.randint(0, 1000, (batch, t), generator=torch.Generator().manual_seed(seed))


def adapter(model, rank, alpha, seed, language="fr", role="in", **kw) -> LoraAdapter:
    """PEFT's init, then B (zero at init) made random too, so both A and B matter."""
    a = LoraAdapter.init(model, rank=rank, alpha=alpha, seed=seed, language=language, role=role, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, B in a.tensors.values():
            B.copy_(torch.randn(B.shape, generator=g) * 0.2)
    return a


def peft_model(hf, named: dict[str, LoraAdapter]):
    """A PeftModel holding each adapter, tensors copied in directly (independent of our file format)."""
    from peft import LoraConfig, get_peft_model

    model = None
    for name, a in named.items():
        cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, use_rslora=a.use_rslora, lora_dropout=a.dropout,
                         target_modules=list(a.target_modules))
        if model is None:
            model = get_peft_model(hf, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():
            for module, (A, B) in a.tensors.items():
                layer = model.base_model.model.get_submodule(module)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    return model.eval()


def loss_of(logits, labels):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_single_adapter_matches_peft(hf, ours, rslora, monkeypatch, ctl):
    a = adapter(ours, rank=4, alpha=8, seed=1, use_rslora=rslora)
    calls = []
    real = controller_mod.dual_lora_linear
    spy = lambda *args: calls.append(args) or real(*args)
    monkeypatch.setattr(controller_mod, "dual_lora_linear", spy)
    monkeypatch.setattr(ops, "dual_lora_linear", spy)  # q/k/v and gate/up run as separate calls of a group
    ctl.set_adapters(lora_in=a, w_in=1.0)
    x = ids()
    with torch.no_grad():
        got, base_logits = ours(x), hf(x).logits
        want = peft_model(hf, {"one": a})(x).logits
    assert (got - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, want, **FP32)
    assert len(calls) == 7 * L and all(c[4] is None for c in calls)  # one adapter alone: no second one
    ctl.clear()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base_logits, **FP32)


def test_output_strategy_matches_peft_cat(hf, ours, ctl):
    a_in = adapter(ours, rank=4, alpha=8, seed=1)
    a_out = adapter(ours, rank=8, alpha=4, seed=2, language="de", role="out")
    ctl.set_adapters(a_in, a_out, w_in=0.3, w_out=0.7, strategy="output")
    peft = peft_model(hf, {"in": a_in, "out": a_out})
    peft.add_weighted_adapter(["in", "out"], [0.3, 0.7], "cat", combination_type="cat")
    peft.set_adapter("cat")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft(x).logits, **FP32)


@pytest.mark.parametrize("alphas", [(16, 16), (16, 4)], ids=["same-alpha", "different-alpha"])
def test_ab_strategy_matches_peft_linear(hf, ours, alphas, ctl):
    a_in = adapter(ours, rank=8, alpha=alphas[0], seed=1)
    a_out = adapter(ours, rank=8, alpha=alphas[1], seed=2, language="de", role="out")
    ctl.set_adapters(a_in, a_out, w_in=0.3, w_out=0.7, strategy="ab")
    peft = peft_model(hf, {"in": a_in, "out": a_out})
    peft.add_weighted_adapter(["in", "out"], [0.3, 0.7], "lin", combination_type="linear")
    peft.set_adapter("lin")
    x = ids()
    with torch.no_grad():
        got = ours(x)
        torch.testing.assert_close(got, peft(x).logits, **FP32)
        ctl.set_adapters(a_in, a_out, w_in=0.3, w_out=0.7, strategy="output")
        assert (ours(x) - got).abs().max() > 1e-3  # ab's cross terms: not the same function as output


@pytest.mark.parametrize("two", [False, True], ids=["in-alone", "in+out"])
def test_gradients_match_peft(hf, ours, two, ctl):
    a_in = adapter(ours, rank=4, alpha=8, seed=1)
    a_out = adapter(ours, rank=8, alpha=4, seed=2, language="de", role="out") if two else None
    # PEFT sums its active adapters with weight 1: compare at w = 1.
    ctl.set_adapters(a_in, a_out, w_in=1.0, w_out=1.0)
    named = {"in": a_in} | ({"out": a_out} if two else {})
    peft = peft_model(hf, named)
    peft.base_model.set_adapter(list(named))
    x, labels = ids(seed=3), ids(seed=4)
    loss_of(ours(x), labels).backward()
    loss_of(peft(x).logits, labels).backward()
    assert all(p.grad is None for p in ours.parameters())  # base frozen
    for name, a in named.items():
        for module, (A, B) in a.tensors.items():
            layer = peft.base_model.model.get_submodule(module)
            torch.testing.assert_close(A.grad, layer.lora_A[name].weight.grad, **GRAD)
            torch.testing.assert_close(B.grad, layer.lora_B[name].weight.grad, **GRAD)


@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_weight_learning_theta_gradient(hf, ours, strategy, tmp_path, ctl):
    a_in = adapter(ours, rank=4, alpha=8, seed=1)
    a_out = adapter(ours, rank=4, alpha=16, seed=2, language="de", role="out")
    theta = ctl.enable_weight_learning(a_in, a_out, strategy=strategy)
    assert theta.shape == (L, 2) and torch.equal(theta, torch.ones(L, 2))
    assert [p for p in ours.parameters() if p.requires_grad] == []
    with torch.no_grad():
        theta.copy_(torch.randn(L, 2, generator=torch.Generator().manual_seed(5)))
    x, labels = ids(seed=3), ids(seed=4)
    loss_of(ours(x), labels).backward()
    assert all(t.grad is None for t in a_in.parameters() + a_out.parameters())  # adapters frozen

    # Reference: the same function written as merged weights on plain tensors, autograd to theta.
    ref_theta = theta.detach().clone().requires_grad_()
    params = dict(hf.named_parameters())
    for module, (A_in, B_in) in a_in.tensors.items():
        layer = int(module.split(".")[2])
        w_in, w_out = torch.softmax(ref_theta[layer], 0)
        A_out, B_out = a_out.tensors[module]
        A_in, B_in, A_out, B_out = A_in.detach(), B_in.detach(), A_out.detach(), B_out.detach()
        if strategy == "output":
            delta = w_in * a_in.scale * B_in @ A_in + w_out * a_out.scale * B_out @ A_out
        else:
            c_in, c_out = (w_in * a_in.scale).sqrt(), (w_out * a_out.scale).sqrt()
            delta = (c_in * B_in + c_out * B_out) @ (c_in * A_in + c_out * A_out)
        params[module + ".weight"] = params[module + ".weight"] + delta
    logits = torch.func.functional_call(hf, params, (x,)).logits
    loss_of(logits, labels).backward()
    torch.testing.assert_close(theta.grad, ref_theta.grad, **GRAD)

    # Learned weights: read out, saved per direction, loaded back into set_adapters.
    weights = ctl.learned_weights()
    torch.testing.assert_close(torch.tensor(weights.pairs()), torch.softmax(theta.detach(), -1))
    weights.save(tmp_path / "fr-de.json")
    lw = LearnedWeights.load(tmp_path / "fr-de.json")
    assert (lw.src, lw.tgt, lw.strategy) == ("fr", "de", strategy)
    layers = len(lw.w_in)
    assert LearnedWeights.load(tmp_path / "fr-de.json", "fr", "de", strategy, layers).pairs() == lw.pairs()
    other = "ab" if strategy == "output" else "output"
    for args, message in ((("fr", "en", strategy, layers), "weights learned for fr->de"), (("fr", "de", other, layers),
                          f"weights learned for fr->de with strategy '{strategy}', not fr->de with '{other}'"),
                          (("fr", "de", strategy, layers + 1), f"weights of {layers} layers, the model has")):
        with pytest.raises(ValueError, match=f"fr-de.json holds {message}"):
            LearnedWeights.load(tmp_path / "fr-de.json", *args)
    with torch.no_grad():
        learned = ours(x)
        ctl.set_adapters(a_in, a_out, w_in=lw.w_in, w_out=lw.w_out, strategy=lw.strategy)
        torch.testing.assert_close(ours(x), learned, **FP32)


def test_save_then_peft_loads(hf, ours, tmp_path, ctl):
    from peft import PeftModel

    a = adapter(ours, rank=4, alpha=12, seed=1, language="ja", role="out", target_modules=["q_proj", "v_proj"])
    a.save(tmp_path / "a")
    peft = PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    ctl.set_adapters(lora_out=a, w_out=1.0)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft(x).logits, **FP32)
    back = LoraAdapter.load(tmp_path / "a")  # our metadata survives beside PEFT's files
    assert (back.language, back.role, back.base, back.target_modules) == ("ja", "out", a.base, ("q_proj", "v_proj"))


def test_save_then_load_keeps_every_setting(ours, tmp_path):
    """What shapes the math (scale, rsLoRA, dropout, which weight learning trains under) and the
    sidecar's metadata survive a save and a load; tensors bit for bit."""
    a = adapter(ours, rank=4, alpha=12, seed=1, use_rslora=True, dropout=0.25, target_modules=["k_proj", "up_proj"])
    a.metadata["note"] = {"steps": 3}
    back = LoraAdapter.load(a.save(tmp_path / "a"))
    assert (back.rank, back.alpha, back.use_rslora, back.dropout, back.scale, back.metadata) == \
        (4, 12.0, True, 0.25, 6.0, {"note": {"steps": 3}})
    assert back.tensors.keys() == a.tensors.keys()
    assert all(torch.equal(back.tensors[n][i], a.tensors[n][i].detach()) for n in a.tensors for i in (0, 1))


def test_peft_saves_then_we_load(hf, ours, tmp_path, ctl):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(hf, LoraConfig(r=6, lora_alpha=10, use_rslora=True, target_modules=["k_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.save_pretrained(tmp_path / "p")
    a = LoraAdapter.load(tmp_path / "p")
    assert (a.rank, a.alpha, a.use_rslora, a.target_modules) == (6, 10, True, ("k_proj", "down_proj"))
    ctl.set_adapters(lora_in=a, w_in=1.0)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft.eval()(x).logits, **FP32)


@pytest.mark.parametrize("in_targets", [TARGET_MODULES, ("q_proj", "v_proj")])
@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_exported_pair_in_peft_equals_merged(hf, ours, strategy, in_targets, tmp_path, ctl):
    """Bound, merged and exported (served by PEFT) alike, also for adapters on different modules
    (the union; a module of one adapter zero-padded to the rank of the rest)."""
    from peft import PeftModel

    a_in = adapter(ours, rank=4, alpha=8, seed=1, target_modules=in_targets)
    a_out = adapter(ours, rank=4 if strategy == "ab" else 8, alpha=4, seed=2, language="de", role="out")
    w_in = torch.tensor([0.2, 0.5, 0.9])  # learned per-layer weights get folded too
    w_out = 1 - w_in
    x = ids()
    with torch.no_grad():
        ctl.set_adapters(a_in, a_out, w_in=w_in, w_out=w_out, strategy=strategy)
        bound = ours(x)
        ctl.merge(a_in, a_out, w_in=w_in, w_out=w_out, strategy=strategy)
        merged = ours(x)
        pair = export_pair(a_in, a_out, w_in=w_in, w_out=w_out, strategy=strategy)
        assert pair.rank == (4 if strategy == "ab" else 12) and pair.target_modules == TARGET_MODULES
        a_in.base = a_out.base = None  # no sidecar: the layers are counted from the tensors' names
        unplaced = export_pair(a_in, a_out, w_in=w_in, w_out=w_out, strategy=strategy)
        assert all(torch.equal(unplaced.tensors[n][i], pair.tensors[n][i]) for n in pair.tensors for i in (0, 1))
        pair.save(tmp_path / "pair")
        served = PeftModel.from_pretrained(hf, tmp_path / "pair").eval()(x).logits
    torch.testing.assert_close(merged, bound, **FP32)
    torch.testing.assert_close(served, merged, **FP32)


def test_merge_then_unmerge_restores_base_exactly(base):
    ours = load_pretrained(base[1], dtype=torch.bfloat16)  # where a `+=` merge would drift
    ctl = AdapterController(ours)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    a_in = adapter(ours, rank=4, alpha=8, seed=1)
    a_out = adapter(ours, rank=4, alpha=8, seed=2, language="de", role="out")
    ctl.merge(a_in, a_out, w_in=0.3, w_out=0.7, strategy="ab")
    assert not torch.equal(ours.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(AdapterError, match="unmerge"):
        ctl.set_adapters(a_in, w_in=1.0)
    ctl.unmerge()
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("strategy", ["output", "ab"])
def test_per_row_pairs_equal_each_row_alone(ours, strategy, ctl):
    fr_in, de_in = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de")
    fr_out = adapter(ours, 4, 16, seed=3, role="out")
    de_out = adapter(ours, 4, 4, seed=4, language="de", role="out")
    pairs = [(fr_in, de_out, 0.3, 0.7), (de_in, fr_out, torch.tensor([0.1, 0.5, 0.8]), torch.tensor([0.9, 0.5, 0.2])),
             (fr_in, None, 1.0, 0.0)]
    row_pair = torch.tensor([1, 0, 2, 1, 0])
    x = ids(batch=5, t=8, seed=6)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        ctl.set_adapter_pairs(pairs, strategy=strategy)
        ctl.route_rows(row_pair)
        got = ours(x, mask)
        for b, p in enumerate(row_pair.tolist()):
            a_in, a_out, w_in, w_out = pairs[p]
            ctl.set_adapters(a_in, a_out, w_in=w_in, w_out=w_out, strategy=strategy)
            torch.testing.assert_close(got[b:b + 1], ours(x[b:b + 1], mask[b:b + 1]), **FP32)


@torch.no_grad()
def test_per_row_pairs_with_beams(ours, ctl):
    fr_in, de_out = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de", role="out")
    ctl.set_adapter_pairs([(fr_in, de_out, 0.5, 0.5), (None, de_out, 0.0, 1.0)])
    row_pair, beams = torch.tensor([1, 0]), 2
    prompt, new = ids(batch=2, t=5, seed=7), ids(batch=4, t=1, seed=8)
    cache = ours.new_cache(2, 5, max_new_tokens=1, num_beams=beams)
    ctl.route_rows(row_pair)
    ours.prefill(prompt, None, cache)
    with pytest.raises(AdapterError, match="repeat_interleave"):
        ours.decode_step(new[:, 0], cache)
    ctl.route_rows(row_pair.repeat_interleave(beams))
    step = ours.decode_step(new[:, 0], cache)
    full = ours(torch.cat((prompt.repeat_interleave(beams, 0), new), 1))[:, -1]
    torch.testing.assert_close(step, full, **FP32)


@pytest.mark.parametrize("w_in,message", [(float("nan"), "w_in must be finite"), (float("inf"), "finite"),
                                           ("0.3", "w_in must be a number"), (torch.tensor([0.5, float("nan"), 0.5]),
                                                                              "finite")])
def test_weights_must_be_finite_numbers(ours, w_in, message, ctl):
    with pytest.raises(AdapterError, match=message):
        ctl.set_adapters(adapter(ours, 4, 8, seed=1), w_in=w_in)


def test_swapped_roles_and_wrong_types_are_rejected(ours, ctl):
    a_in, a_out = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de", role="out")
    with pytest.raises(AdapterError, match=r"lora_in was given out\[de\], an 'out' adapter"):
        ctl.set_adapters(a_out, a_in)
    with pytest.raises(AdapterError, match="lora_in must be a LoraAdapter or None, got str"):
        ctl.set_adapters("fr")


def test_ab_with_unequal_ranks_is_rejected(ours, ctl):
    a_in, a_out = adapter(ours, 4, 8, seed=1), adapter(ours, 8, 8, seed=2, language="de", role="out")
    with pytest.raises(AdapterError, match=r"equal ranks: in\[fr\] has rank 4, out\[de\] has rank 8"):
        ctl.set_adapters(a_in, a_out, strategy="ab")
    with pytest.raises(AdapterError, match="equal ranks"):
        export_pair(a_in, a_out, strategy="ab")


def test_a_merged_pair_belongs_to_the_model_not_its_controller(base):
    """No controller binds or merges over a merged pair, not even one made before the merge (its
    unmerge would restore weights that held the first pair); any controller, a new one included, can
    unmerge it: a merge through a controller that is then dropped is not lost."""
    ours = load_pretrained(base[1], dtype=torch.float32)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    a_in, a_out = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de", role="out")
    early = AdapterController(ours)
    AdapterController(ours).merge(a_in, None, w_in=1.0)
    for attempt in (lambda: early.set_adapters(a_in, w_in=1.0), lambda: early.merge(None, a_out),
                    lambda: early.set_adapter_pairs([(a_in, a_out, 0.5, 0.5)]),
                    lambda: early.enable_weight_learning(a_in, a_out)):
        with pytest.raises(AdapterError, match="a pair is merged into the base weights: call unmerge"):
            attempt()
    assert not all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    AdapterController(ours).unmerge()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    with pytest.raises(AdapterError, match="no pair is merged"):
        early.unmerge()
    early.merge(None, a_out, w_out=1.0)  # the weights are the base's again
    early.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_export_pair_refuses_a_pair_that_does_not_belong_together(ours):
    a_in, a_out = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de", role="out")
    with pytest.raises(AdapterError, match=r"lora_in was given out\[de\], an 'out' adapter"):
        export_pair(a_out, a_in)
    wider = random_model(Qwen2Config(**{**SMALL, "hidden_size": 48, "num_attention_heads": 6}))
    stranger = adapter(wider, 4, 8, seed=2, language="de", role="out")
    with pytest.raises(AdapterError, match=r"in\[fr\] was trained for .*hidden_size=96.*, out\[de\] for "
                                          r".*hidden_size=48.*: not one base"):
        export_pair(a_in, stranger)
    stranger.base = a_in.base  # a sidecar that claims the same base: the shapes still tell
    with pytest.raises(AdapterError, match=r"q_proj maps 96 -> 96 in in\[fr\] but 48 -> 48 in out\[de\]"):
        export_pair(a_in, stranger)


def test_a_sidecar_with_fewer_layers_than_the_tensors_is_refused(ours, tmp_path):
    a = adapter(ours, 4, 8, seed=1)
    a.save(tmp_path / "in")
    side = json.loads((tmp_path / "in" / SIDECAR_FILE).read_text())
    side["base"]["num_hidden_layers"] = 1
    (tmp_path / "in" / SIDECAR_FILE).write_text(json.dumps(side))
    with pytest.raises(AdapterError, match=r"model.layers.1.\S+ lies past the 1 layers of its base"):
        LoraAdapter.load(tmp_path / "in")


def test_adapter_for_another_base_model_is_rejected(ours, tmp_path, ctl):
    other = random_model(Qwen2Config(**{**SMALL, "num_hidden_layers": 4}))
    a = adapter(other, 4, 8, seed=1)
    with pytest.raises(AdapterError, match=r"in\[fr\] was trained for qwen2 \(hidden_size=96, num_hidden_layers=4\)"):
        ctl.set_adapters(a, w_in=1.0)
    # Without our sidecar (a plain PEFT file) the module check still names the stranger.
    a.save(tmp_path / "a")
    (tmp_path / "a" / "modlora.json").unlink()
    with pytest.raises(AdapterError, match=r"does not have: \['model.layers.3.mlp.down_proj'"):
        ctl.set_adapters(LoraAdapter.load(tmp_path / "a"), w_in=1.0)


def test_unknown_target_module_is_rejected(ours):
    with pytest.raises(AdapterError, match=r"unknown target module\(s\) \['lm_head'\].*'q_proj'"):
        LoraAdapter.init(ours, rank=4, alpha=8, target_modules=["q_proj", "lm_head"])


def test_missing_tensor_in_adapter_file_is_named(ours, tmp_path, ctl):
    adapter(ours, 4, 8, seed=1).save(tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, file)
    with pytest.raises(AdapterError, match=f"missing tensor {gone}"):
        LoraAdapter.load(tmp_path / "a")
    del tensors[gone.replace("lora_B", "lora_A")]
    save_file(tensors, file)
    with pytest.raises(AdapterError, match="lacks tensors for 1 targeted module.*model.layers.1.mlp.up_proj"):
        ctl.set_adapters(LoraAdapter.load(tmp_path / "a"))


@pytest.mark.parametrize("pair", ["in-alone", "output", "ab", "ab-out-undropped"])
def test_dropout_matches_peft_in_training(hf, ours, pair, ctl):
    """Same seed, same op order, same shapes: PEFT's dropout masks are ours, bit for bit. Under
    ``ab`` the merged adapter is dropped with the larger p (PEFT's merged adapter takes the first's)."""
    rank = 8 if pair.startswith("ab") else 4
    a_in = adapter(ours, rank=rank, alpha=8, seed=1, dropout=0.3)
    a_out = None if pair == "in-alone" else adapter(ours, rank=8, alpha=4, seed=2, language="de", role="out",
                                                    dropout=0.0 if pair == "ab-out-undropped" else 0.3)
    named = {"in": a_in} | ({"out": a_out} if a_out else {})
    peft = peft_model(hf, named)
    if pair.startswith("ab"):
        ctl.set_adapters(a_in, a_out, w_in=0.3, w_out=0.7, strategy="ab")
        peft.add_weighted_adapter(["in", "out"], [0.3, 0.7], "lin", combination_type="linear")
        peft.set_adapter("lin")
    else:  # PEFT sums its active adapters with weight 1
        ctl.set_adapters(a_in, a_out, w_in=1.0, w_out=1.0)
        peft.base_model.set_adapter(list(named))
    x, labels = ids(seed=3), ids(seed=4)
    with torch.no_grad():
        evaluated = ours(x)
    ours.train(), peft.train()
    torch.manual_seed(5)
    got = ours(x)
    torch.manual_seed(5)
    want = peft(x).logits
    assert (got - evaluated).abs().max() > 1e-3  # dropout really applied in training
    torch.testing.assert_close(got, want, **FP32)
    loss_of(got, labels).backward()
    loss_of(want, labels).backward()
    if not pair.startswith("ab"):
        for name, a in named.items():
            for module, (A, B) in a.tensors.items():
                layer = peft.base_model.model.get_submodule(module)
                torch.testing.assert_close(A.grad, layer.lora_A[name].weight.grad, **GRAD)
                torch.testing.assert_close(B.grad, layer.lora_B[name].weight.grad, **GRAD)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), evaluated, rtol=0, atol=0)  # no dropout in eval mode


@pytest.mark.parametrize("w_in,strategy,message", [
    (torch.ones(L - 1), "output", rf"w_in must be a float or a tensor of shape \[{L}\] \(one per layer\), got shape"),
    (torch.ones(L, 1), "output", "got shape"),
    (float("nan"), "output", "w_in must be finite"),
    (True, "output", "w_in must be a number or a tensor"),
    (-0.5, "ab", "strategy 'ab' scales A and B by sqrt"),
    (torch.tensor([0.5, -0.1, 0.5]), "ab", "needs w_in >= 0"),
])
def test_bad_weights_are_refused_before_anything_is_bound(ours, ctl, w_in, strategy, message):
    a_in, a_out = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de", role="out")
    ctl.set_adapters(a_in, w_in=1.0)
    x = ids()
    with torch.no_grad():
        before = ours(x)
    with pytest.raises(AdapterError, match=message):
        ctl.set_adapters(a_in, a_out, w_in=w_in, w_out=0.5, strategy=strategy)
    with torch.no_grad():
        assert torch.equal(ours(x), before)


def test_rows_are_routed_by_a_1d_integer_tensor_and_cleared_with_the_pairs(ours, ctl):
    a_in = adapter(ours, 4, 8, seed=1)
    ctl.set_adapter_pairs([(a_in, None, 1.0, 0.0), (None, None, 0.0, 0.0)])
    for bad in (torch.zeros(2), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(AdapterError, match="row_pair must be a 1-D integer tensor"):
            ctl.route_rows(bad)
    ctl.route_rows(torch.tensor([0, 1]))
    ctl.clear()
    ctl.set_adapter_pairs([(a_in, None, 1.0, 0.0)])
    with pytest.raises(AdapterError, match=r"needs route_rows\(row_pair\) before the forward"), torch.no_grad():
        ours(ids())


def test_a_bf16_merge_rounds_once():
    """``W + B A`` in fp32, rounded to bf16 once: adding a bf16-rounded product rounds twice."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 32, generator=g).bfloat16()
    A, B = torch.randn(4, 32, generator=g), torch.randn(64, 4, generator=g) * 0.01
    merged = W.clone()
    fold_into(merged, A, B)
    assert torch.equal(merged, (W.float() + B @ A).bfloat16())
    assert not torch.equal(merged, W + (B @ A).bfloat16())


def test_init_is_peft_kaiming_uniform(ours):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0, fp32 leaves."""
    a = LoraAdapter.init(ours, rank=16, alpha=8, seed=3)
    for A, B in a.tensors.values():
        bound = A.shape[1] ** -0.5
        assert 0.9 * bound < A.abs().max() <= bound and not B.any()
        assert A.dtype == B.dtype == torch.float32 and A.requires_grad and B.requires_grad


def test_dropout_is_checked(ours, ctl):
    with pytest.raises(AdapterError, match=r"dropout must be in \[0, 1\), got 1.0"):
        LoraAdapter.init(ours, rank=4, alpha=8, dropout=1.0)
    a = adapter(ours, 4, 8, seed=1, dropout=0.1)
    ctl.set_adapter_pairs([(a, None, 1.0, 0.0)])
    ctl.route_rows(torch.zeros(2, dtype=torch.long))
    ours.train()
    with pytest.raises(AdapterError, match=r"per-row adapter pairs .* no LoRA dropout: call model.eval\(\)"):
        ours(ids())


def test_pool(ours, tmp_path):
    pool = AdapterPool(tmp_path / "pool")
    for lang in ("fr", "de"):
        for role in ("in", "out"):
            pool.save(adapter(ours, 4, 8, seed=len(lang + role), language=lang, role=role))
    assert pool.languages() == ["de", "fr"] and ("fr", "out") in pool
    fresh = AdapterPool(tmp_path / "pool")
    a = fresh.get("fr", "out")
    assert (a.language, a.role, a.rank) == ("fr", "out", 4) and fresh.get("fr", "out") is a
    fresh.check(ours)
    assert len(fresh.listing().splitlines()) == 4
    with pytest.raises(AdapterError, match=r"unknown language 'ja' in adapter pool .*\['de', 'fr'\]"):
        fresh.get("ja", "in")
    other = random_model(Qwen2Config(**{**SMALL, "hidden_size": 48}))
    with pytest.raises(AdapterError, match=r"in\[de\]: .*hidden_size=96"):
        fresh.check(other)


def test_a_pool_lists_its_languages_and_names_every_bad_adapter(ours, tmp_path):
    """A backup folder is no language; an adapter in another adapter's folder (its sidecar says so)
    is refused, not relabelled; :meth:`check` names every adapter that does not fit, a file's bad
    field included, in one error."""
    pool = AdapterPool(tmp_path)
    for lang in ("fr", "de"):
        for role in ("in", "out"):
            pool.save(adapter(ours, 4, 8, seed=len(lang + role), language=lang, role=role))
    shutil.copytree(tmp_path / "fr", tmp_path / "fr.old")
    (tmp_path / "ja" / "in").mkdir(parents=True)  # a save cut short: no config yet
    (tmp_path / "ja" / "in" / "adapter_model.safetensors").write_bytes(b"")
    assert pool.languages() == ["de", "fr"] and len(pool.listing().splitlines()) == 4
    shutil.rmtree(tmp_path / "fr" / "in")
    shutil.copytree(tmp_path / "de" / "out", tmp_path / "fr" / "in")
    config = tmp_path / "de" / "in" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8.0', '"lora_alpha": -1'))
    fresh = AdapterPool(tmp_path)
    with pytest.raises(AdapterError, match=r"fr/in holds out\[de\] \(its modlora.json\), not in\[fr\]"):
        fresh.get("fr", "in")
    with pytest.raises(AdapterError, match=r"in\[de\]: .*lora_alpha must be > 0, got -1.*; in\[fr\]: .* holds out"):
        fresh.check(ours)


def test_learned_weights_json_is_per_direction(ours, tmp_path, ctl):
    a_in, a_out = adapter(ours, 4, 8, seed=1), adapter(ours, 4, 8, seed=2, language="de", role="out")
    ctl.enable_weight_learning(a_in, a_out)
    raw = json.loads(ctl.learned_weights().save(tmp_path / "w.json").read_text())
    assert raw["w_in"] == [0.5] * L and raw["theta"] == [[1.0, 1.0]] * L
    with torch.no_grad():
        ctl.theta.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.0, 0.0]]))
    back = LearnedWeights.load(ctl.learned_weights().save(tmp_path / "w.json"), "fr", "de", "output", L)
    assert torch.equal(back.theta, ctl.theta.detach())
    assert torch.equal(back.w_in, torch.softmax(ctl.theta.detach(), -1)[:, 0])



def test_one_controller_per_model(ours, ctl):
    ctl.set_adapters(adapter(ours, 4, 8, seed=1), w_in=1.0)
    with pytest.raises(AdapterError, match="another AdapterController"):
        AdapterController(ours)
    ctl.clear()
    assert AdapterController(ours).model is ours  # nothing bound any more: a new owner is fine
