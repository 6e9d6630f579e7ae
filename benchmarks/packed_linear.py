"""torch's fp32 F.linear (MKL) against ggro.packed (oneDNN, weights packed once) on this CPU: one layer shape at
several row counts, then the embedded model's decode step (no gradient) and a guide call (forward and the input
gradient), best of a few alternating runs. Prints a table and writes packed_linear.png.

    GGRO_THREADS=2 python benchmarks/packed_linear.py [OUT_DIR]

Used for docs/performance.md "fp32 layers on packed weights"; run it alone on the machine."""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GGRO_THREADS", "1")
import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ["GGRO_THREADS"]))
from ggro.models import load_model
from ggro.packed import pack_linears

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
REPEATS = 3


def best(f) -> float:
    f()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


# one layer shape (the embedded model's MLP up-projection), 100 copies so that no weight stays in cache
layers = [torch.nn.Linear(576, 1536, bias=False).requires_grad_(False) for _ in range(100)]
packed = torch.nn.Sequential(*[torch.nn.Linear(576, 1536, bias=False).requires_grad_(False) for _ in range(100)])
for a, b in zip(layers, packed):
    b.weight.copy_(a.weight)
pack_linears(packed)
rows = []
for m in (1, 5, 14, 64, 256, 1024):
    x = torch.randn(m, 576)
    t_mkl = best(lambda: [F.linear(x, lin.weight) for lin in layers])
    t_dnn = best(lambda: [lin(x) for lin in packed])
    rows.append((f"Linear 576->1536 x100, {m} rows", t_mkl, t_dnn))

model = load_model("default")
emb = model.get_input_embeddings()
gen = torch.Generator().manual_seed(0)
cases = [(f"decode step, {b} rows", torch.randint(0, 49000, (b, 1), generator=gen), False) for b in (1, 5, 14, 64)]
cases += [(f"guide call with gradient, {b} x 26 tokens", torch.randint(0, 49000, (b, 26), generator=gen), True)
          for b in (1, 8)]


def run(ids, grad):
    if not grad:
        with torch.no_grad():
            return model(input_ids=ids).logits
    e = emb(ids).detach().requires_grad_(True)
    h = model.model(inputs_embeds=e).last_hidden_state
    return torch.autograd.grad(h[:, -1].sum(), e)[0]


mkl = {name: best(lambda: run(ids, grad)) for name, ids, grad in cases}
pack_linears(model)
rows += [(name, mkl[name], best(lambda: run(ids, grad))) for name, ids, grad in cases]

print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
      f"{torch.get_num_threads()} threads, best of {REPEATS}\n")
print("| case | F.linear (MKL), ms | packed (oneDNN), ms | speed-up |\n|---|---:|---:|---:|")
for name, a, b in rows:
    print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x |")

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 4))
ax.barh([r[0] for r in rows], [r[1] / r[2] for r in rows])
ax.axvline(1.0, color="k", lw=0.8)
ax.set_xlabel("speed-up of packed oneDNN over F.linear (MKL)")
ax.invert_yaxis()
fig.tight_layout()
fig.savefig(out / "packed_linear.png", dpi=100)
print(f"\nwrote {out / 'packed_linear.png'}")
