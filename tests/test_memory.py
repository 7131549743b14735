"""Weight memory (modlora.memory, adapted.pack, Qwen2ForCausalLM.pack_weights): every weight in a
buffer that starts on a huge page and is advised for them, values and names unchanged."""

import gc
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from modlora import adapted
from modlora.config import Qwen2Config
from modlora.loading import random_model
from modlora.memory import HUGE_PAGE, weight_buffer
from modlora.model import Qwen2ForCausalLM

CONFIG = Qwen2Config.preset("tiny")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.is_file(),
                               reason="transparent huge pages are a Linux kernel feature this machine lacks")


def _mapping(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps entry of the mapping that holds ``address`` (its fields), or None."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            entry = {} if lo <= address < hi else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
            if key == "VmFlags":
                return entry
    return None


@needs_thp
def test_a_weight_buffer_starts_on_a_huge_page_and_is_advised_for_them():
    buf = weight_buffer(3 * HUGE_PAGE // 2 + 5, torch.bfloat16)
    assert buf.shape == (3 * HUGE_PAGE // 2 + 5,) and buf.dtype == torch.bfloat16 and buf.is_contiguous()
    assert buf.data_ptr() % HUGE_PAGE == 0
    buf.copy_(torch.arange(buf.numel()).to(torch.bfloat16))  # every byte writable
    assert torch.equal(buf, torch.arange(buf.numel()).to(torch.bfloat16))
    assert "hg" in _mapping(buf.data_ptr())["VmFlags"].split()  # MADV_HUGEPAGE took effect


@needs_thp
def test_a_weight_buffer_is_unmapped_with_its_last_view():
    buf = weight_buffer(HUGE_PAGE, torch.float32)
    address = buf.data_ptr()
    view = buf[10:20]
    del buf
    gc.collect()
    assert _mapping(address) is not None
    del view
    gc.collect()
    assert _mapping(address) is None


def test_a_weight_buffer_off_the_cpu_is_an_ordinary_tensor():
    buf = weight_buffer(7, torch.float16, "meta")
    assert buf.device.type == "meta" and buf.shape == (7,) and buf.dtype == torch.float16
    assert weight_buffer(0, torch.float32).shape == (0,)


@needs_thp
@pytest.mark.parametrize("tied", [True, False])
def test_each_layer_keeps_its_linears_in_one_buffer_and_packing_changes_no_value(tied):
    model = random_model(replace(CONFIG, tie_word_embeddings=tied), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    model.pack_weights()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [n for n, _ in model.named_parameters()] == names
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert not model.model.layers[0].mlp.gate_proj.weight.requires_grad
    for layer in model.model.layers:
        weights = [lin.weight for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                          layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                          layer.mlp.down_proj)]
        assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
        assert weights[0].data_ptr() % HUGE_PAGE == 0
        assert "hg" in _mapping(weights[0].data_ptr())["VmFlags"].split()
    embed = model.model.embed_tokens.weight
    assert embed.data_ptr() % HUGE_PAGE == 0
    assert (model.lm_head.weight is embed) == tied
    if not tied:
        assert model.lm_head.weight.data_ptr() % HUGE_PAGE == 0


def test_packing_modules_of_two_dtypes_gives_each_dtype_its_own_buffer():
    torch.manual_seed(0)
    linears = [adapted.AdaptedLinear(8, 4, bias=True) for _ in range(3)]
    linears[1].to(torch.bfloat16)
    values = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]
    adapted.pack([linears])
    for lin, (w, b) in zip(linears, values, strict=True):
        assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b) and lin.weight.dtype == w.dtype
    storages = [lin.weight.untyped_storage().data_ptr() for lin in linears]
    assert storages[0] == storages[2] != storages[1]
    assert all(lin.bias.untyped_storage().data_ptr() != linears[0].bias.untyped_storage().data_ptr()
               for lin in linears[1:])  # mixed dtypes: the group's biases stay as they were, each alone


def test_a_model_built_on_the_meta_device_keeps_its_meta_tensors():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(replace(CONFIG, hidden_size=1 << 20, intermediate_size=1 << 22))
    assert all(p.is_meta for p in model.parameters())
