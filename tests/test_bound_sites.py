"""modlora.cpu.BoundSites: a decode step's linears, each bound to the C++ calls its first run
made, give the logits of the unbound step bit for bit, bind only calls on the site's own input whose
outputs the site returned (whole or as column blocks, in order), and leave every other site to its
Python."""

from __future__ import annotations

import threading

import pytest
import torch
from test_grouped import _model

from modlora import cpu, dispatch, ops
from modlora.cpu import BoundSites
from modlora.model import run_site

pytestmark = [pytest.mark.skipif(not cpu.HAVE_C, reason="modlora._C is not built (CI builds it)"),
              pytest.mark.usefixtures("one_thread")]


def _weights(g: torch.Generator):
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    return rnd(24, 16), rnd(24), rnd(1, 4, 16), rnd(1, 24, 4)


@torch.no_grad()
def test_a_single_call_site_is_bound_and_replays_its_call_on_new_input():
    W, b, A, B = _weights(torch.Generator().manual_seed(0))
    fn = lambda x: cpu.lora_bank_linear(x, W, b, A, B)
    sites = BoundSites()
    x1, x2 = torch.randn(2, 3, 1, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sites(fn, x1), fn(x1))
    assert sites.bound == 1
    got = sites(fn, x2)
    assert got.shape == (3, 1, 24) and torch.equal(got, fn(x2))


@torch.no_grad()
def test_a_group_site_is_bound_with_its_splits():
    W, b, A, B = _weights(torch.Generator().manual_seed(0))
    fn = lambda x: list(cpu.lora_bank_linear(x, W, b, A, B).split([16, 4, 4], dim=-1))
    sites = BoundSites()
    x1, x2 = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    sites(fn, x1)
    assert sites.bound == 1
    got, want = sites(fn, x2), fn(x2)
    assert [t.shape for t in got] == [t.shape for t in want] and all(map(torch.equal, got, want))


@torch.no_grad()
def test_a_group_run_as_one_call_per_part_is_bound_with_every_call(monkeypatch):
    """Where dispatch runs a group's parts as separate calls, the site replays each of them."""
    g = torch.Generator().manual_seed(0)
    (W1, b1, A, B1), (W2, *_) = _weights(g), _weights(g)
    fn = lambda x: [*cpu.lora_bank_linear(x, W1, b1, A, B1).split([16, 8], dim=-1), cpu.lora_bank_linear(x, W2)]
    sites = BoundSites()
    x1, x2 = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    sites(fn, x1)
    assert sites.bound == 1
    replayed = []
    real = cpu._OP
    monkeypatch.setattr(cpu, "_OP", lambda x, *args: replayed.append(args[0]) or real(x, *args))
    got = sites(fn, x2)
    assert [w.data_ptr() for w in replayed] == [W1.data_ptr(), W2.data_ptr()]
    monkeypatch.undo()
    want = fn(x2)
    assert [t.shape for t in got] == [t.shape for t in want] and all(map(torch.equal, got, want))


@pytest.mark.usefixtures("calibrating")
@torch.no_grad()
def test_a_site_that_calibrates_on_its_first_run_is_bound(monkeypatch):
    """Dispatch's calibration runs the op on inputs of its own inside the site's first run: those
    calls are not the site's."""
    measure = dispatch._measure
    measured = []
    monkeypatch.setattr(dispatch, "_measure", lambda *a: measured.append(a[-1]) or  # runs every path, C wins
                        {p: 1.0 if p.startswith("c") else 2.0 for p in measure(*a)})
    W, b, _, _ = _weights(torch.Generator().manual_seed(0))
    sites = BoundSites()
    sites(lambda x: ops.linear(x, W, b), torch.randn(3, 16))
    assert measured and sites.bound == 1


@pytest.mark.parametrize("site", ["call dropped", "output repeated", "output changed", "input changed",
                                  "second input changed", "torch only", "columns dropped"])
@torch.no_grad()
def test_a_site_that_is_not_plain_calls_keeps_running_its_python(site):
    W, b, A, B = _weights(torch.Generator().manual_seed(0))
    op = lambda x: cpu.lora_bank_linear(x, W, b, A, B)
    fn = {"call dropped": lambda x: [op(x), op(x)][:1],
          "output repeated": lambda x: [y := op(x), y],
          "output changed": lambda x: op(x) + 1,
          "input changed": lambda x: op(2 * x),
          "second input changed": lambda x: [op(x), op(2 * x)],
          "torch only": lambda x: torch.nn.functional.linear(x, W, b),
          "columns dropped": lambda x: list(op(x).split([16, 8], dim=-1))[:1]}[site]
    sites = BoundSites()
    x1, x2 = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    sites(fn, x1)
    assert sites.bound == 0
    got, want = sites(fn, x2), fn(x2)
    assert torch.equal(torch.stack(list(got)) if isinstance(got, list) else got,
                       torch.stack(list(want)) if isinstance(want, list) else want)


@torch.no_grad()
def test_calls_of_another_thread_do_not_enter_a_sites_record():
    W, b, A, B = _weights(torch.Generator().manual_seed(0))
    op = lambda x: cpu.lora_bank_linear(x, W, b, A, B)

    def fn(x):  # while this site records, another thread calls the op
        other = threading.Thread(target=op, args=(torch.randn(2, 16),))
        other.start()
        other.join()
        return op(x)

    sites = BoundSites()
    sites(fn, torch.randn(3, 16))
    assert sites.bound == 1


def _steps(model, ids, site, steps: int = 3) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1], max_new_tokens=steps, num_beams=1)
    model.prefill(ids, None, cache)
    return torch.stack([model.decode_step(ids[:, t], cache, site) for t in range(steps)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "pair", "rows"])
@pytest.mark.parametrize("c", [True, False])
@pytest.mark.parametrize("groups", ["one call", "per part"])
@torch.no_grad()
def test_bound_decode_steps_equal_the_unbound_ones(dtype, mode, c, groups, monkeypatch):
    """Every linear of a step bound (4 sites per layer and the lm_head) with the C++ op, q/k/v and
    gate/up run as one call or as one per part, none without C (the torch path: nothing to bind);
    the logits identical either way."""
    split = groups == "per part"  # a group's "torch" means separate calls (ops.grouped_linear)
    monkeypatch.setattr(dispatch, "choose", lambda kind, x, weight, run: "torch" if split and "group" in kind else "c")
    model, ctl = _model(dtype, "pair" if mode == "none" else mode)
    if mode == "none":
        ctl.clear()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    if mode == "rows":
        ctl.route_rows(torch.tensor([0, 1]))
    cpu.set_c_enabled(c)
    try:
        sites = BoundSites()
        bound, plain = _steps(model, ids, sites), _steps(model, ids, run_site)
    finally:
        cpu.set_c_enabled(True)
    assert sites.bound == (4 * model.config.num_hidden_layers + 1 if c else 0)
    assert torch.equal(bound, plain)
