"""A CPU's fp32 Linear layers on oneDNN-packed weights (ggro/packed.py) against torch's own F.linear."""
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import llama_config
from ggro.packed import available_memory, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(40, hidden_size=64, intermediate_size=160))
    return model.float().eval().requires_grad_(False)


def logits_and_gradient(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (grad,) = torch.autograd.grad(logits[:, -1, 7].sum(), embeds)
    return logits.detach(), grad


def test_a_packed_model_computes_what_f_linear_computes():
    """Every Linear is packed; logits and the input-embedding gradient (the guide's) agree with the unpacked
    model's to fp32 rounding, at batch 1 and batch 5 with padding-free rows."""
    plain, packed = tiny_llama(), tiny_llama()
    n = pack_linears(packed)
    assert n == sum(type(m) is torch.nn.Linear for m in packed.modules()) > 0
    for ids in (torch.randint(0, 40, (1, 9)), torch.randint(0, 40, (5, 13))):
        (want, want_g), (got, got_g) = logits_and_gradient(plain, ids), logits_and_gradient(packed, ids)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        assert torch.allclose(got_g, want_g, rtol=1e-4, atol=1e-5)
        assert got_g.abs().sum() > 0
    assert pack_linears(packed) == 0      # packed already: nothing to do twice
    again = tiny_llama()
    with torch.no_grad():                 # as a decoder's setup may ask for it
        assert pack_linears(again) == n


def test_a_changed_weight_is_read_as_it_is_now():
    """Packing copies the weights: a weight written in place, replaced, trained or cast after packing is read
    as it is now (F.linear), never from the stale copy."""
    lin = torch.nn.Linear(16, 24).requires_grad_(False)
    seq = torch.nn.Sequential(lin)
    assert pack_linears(seq) == 1
    x = torch.randn(3, 16)
    assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2)                                    # in place
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    lin.weight = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)   # replaced
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    lin.double()                                              # cast
    assert lin(x.double()).dtype == torch.float64
    lin.float().requires_grad_(True)                          # trained: the weight gets its gradient
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_a_packed_model_compiles_whole():
    """Under torch.compile (the decoder's --compile step) a packed layer traces as F.linear: fullgraph holds."""
    model = tiny_llama(1)
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        pack_linears(model)
        got = torch.compile(lambda i: model(input_ids=i).logits, fullgraph=True, backend="aot_eager")(ids)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_is_what_linux_says_at_most():
    """Packing asks how much memory is left before it copies weights: Linux's MemAvailable, or less under a
    cgroup limit; never more than the machine has."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    free = available_memory()
    assert 0 < free <= info["MemAvailable"] + 64 * 2**20 and free <= info["MemTotal"]
