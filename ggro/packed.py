"""A CPU's fp32 Linear layers through oneDNN with their weights packed once, forward and input gradient.

torch's fp32 `F.linear` on a CPU calls MKL's sgemm, which packs the weight into its blocked layout on every call:
at a decode step's few rows that repacking costs more than the multiply, and it is most of a step's time. oneDNN
(in every x86 torch build; the kernels inductor's CPU freezing uses) multiplies by a weight packed once. The
same fp32 products and sums in another order: outputs differ from MKL's in the last bits, as MKL's own differ
between batch sizes. docs/performance.md has the measurements. Only frozen weights are packed (the guide's
gradient is taken with respect to its input embeddings, never the weights), and a layer whose weight was
replaced or written in place since goes back to `F.linear`, as does anything traced by torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS_HINT = 64      # the batch size oneDNN packs for; every row count runs on the layout (64: the fastest measured)


def _mm(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """y = x W^T + b over `forward_w` (W packed); the input's gradient g W over `backward_w` (W^T packed)."""

    @staticmethod
    def forward(ctx, x, bias, forward_w, backward_w):
        ctx.backward_w = backward_w
        return _mm(x, forward_w, bias)

    @staticmethod
    def backward(ctx, g):
        return _mm(g.contiguous(), ctx.backward_w, None), None, None, None


class _Packed:
    """A Linear's forward over its weight as packed, while that weight is what it was: the same storage (held
    here, so no other tensor can take its address) at the same version (an in-place write bumps it)."""

    def __init__(self, mod: torch.nn.Linear):
        self.mod, self.weight = mod, mod.weight.detach()
        self.version = self.weight._version
        self.fwd = torch.ops.mkldnn._reorder_linear_weight(self.weight, ROWS_HINT)
        self.bwd = None     # W^T, packed on the first gradient call: a model that only decodes never needs it

    def current(self) -> bool:
        w = self.mod.weight
        if self.fwd is not None and (w.data_ptr() != self.weight.data_ptr() or w._version != self.version
                                     or w.dtype != torch.float32 or w.requires_grad):
            self.weight = self.fwd = self.bwd = None      # stale for good: free the copies
        return self.fwd is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.mod.bias
        if (torch.compiler.is_compiling() or not x.is_cpu or x.dtype != torch.float32 or not self.current()
                or (b is not None and b.requires_grad)):
            return F.linear(x, self.mod.weight, b)
        rows = x.reshape(-1, x.shape[-1])
        if x.requires_grad and torch.is_grad_enabled():       # the guide's gradient call
            if self.bwd is None:
                self.bwd = torch.ops.mkldnn._reorder_linear_weight(self.weight.t().contiguous(), ROWS_HINT)
            y = _Linear.apply(rows, b, self.fwd, self.bwd)
        else:                                                  # decoding: no autograd node to build
            y = _mm(rows, self.fwd, b)
        return y.view(*x.shape[:-1], y.shape[-1])


def _works() -> bool:
    """oneDNN's packed linear is in this torch build and agrees with F.linear here."""
    try:
        with torch.enable_grad():       # packing may be asked for inside no_grad
            w, x = torch.randn(24, 16), torch.randn(3, 16, requires_grad=True)
            p = torch.nn.Linear(16, 24).requires_grad_(False)
            with torch.no_grad():
                p.weight.copy_(w)
            y = _Packed(p)(x)
            (g,) = torch.autograd.grad(y.sum(), x)
        return (torch.allclose(y, F.linear(x, w, p.bias), atol=1e-4)
                and torch.allclose(g, w.sum(0).expand(3, -1), atol=1e-4))
    except (RuntimeError, AttributeError):
        return False


def available_memory() -> int | None:
    """Bytes this process may still take: Linux's MemAvailable (free memory and the page cache it may drop),
    capped by its cgroup's limit (a container, a Kubernetes pod, a Ray worker with a memory limit) where one is
    set; None where neither can be read."""
    sizes = []
    try:
        with open("/proc/meminfo") as f:
            sizes += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    try:        # cgroup v2: this process's group; v1: the memory controller's root as the container sees it
        with open("/proc/self/cgroup") as f:
            group = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")
    except OSError:
        group = "/"
    v2, v1 = f"/sys/fs/cgroup{group.rstrip('/')}/memory", "/sys/fs/cgroup/memory/memory"
    for limit, usage in ((f"{v2}.max", f"{v2}.current"), (f"{v1}.limit_in_bytes", f"{v1}.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                sizes.append(int(a.read()) - int(b.read()))
        except (OSError, ValueError):       # absent, or "max": no limit there
            pass
    return min(sizes) if sizes else None


def _room(nbytes: int) -> bool:
    """Two packed copies of `nbytes` of weights (W, and W^T once a gradient is taken) fit in half the memory
    still available (unknown: assume not)."""
    free = available_memory()
    return free is not None and 2 * nbytes <= free // 2


def pack_linears(model: torch.nn.Module) -> int:
    """Run `model`'s frozen fp32 CPU Linear layers on packed weights (in place); how many. None where oneDNN is
    missing or disagrees, or where the packed copies (twice the weights) would not fit comfortably in memory."""
    mods = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__
            and m.weight.is_cpu and m.weight.dtype == torch.float32 and not m.weight.requires_grad]
    if not mods or not _room(sum(m.weight.numel() * 4 for m in mods)) or not _works():
        return 0
    for m in mods:
        m.forward = _Packed(m)
    return len(mods)
