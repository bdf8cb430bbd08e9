"""``python -m fastattn.demo``: run every op on every backend available for the present device
and show how far each lands from the float64 reference, next to PyTorch's own error.

This is the README's main job until the benchmark harness lands; it reports accuracy only.
Speed and memory figures come from the harness alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _cases(device: str, quick: bool):
    from fastattn import reference as R

    rows = 4 if quick else 256
    vocab = 4099 if quick else 50257
    x = 3 * torch.randn(rows, vocab, device=device)
    target = torch.randint(0, vocab, (rows,), device=device)
    scores = torch.randn(2, 4, 64, 96, device=device)
    keep = torch.rand(2, 1, 1, 96, device=device) > 0.2
    return [
        ("softmax", x, lambda f, t: f.softmax(t, -1), lambda t: R.softmax(t, -1)),
        ("log_softmax", x, lambda f, t: f.log_softmax(t, -1), lambda t: R.log_softmax(t, -1)),
        ("softmax scale+mask+causal", scores,
         lambda f, t: f.softmax(t, -1, scale=0.125, mask=keep, causal=True),
         lambda t: R.softmax(t, -1, scale=0.125, mask=keep, causal=True)),
        ("cross_entropy smoothing+z_loss", x,
         lambda f, t: f.cross_entropy(t, target, label_smoothing=0.1, z_loss=1e-4),
         lambda t: R.cross_entropy(t, target, label_smoothing=0.1, z_loss=1e-4)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU interpreter)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # Show the Triton kernels on CPU through Triton's interpreter (set before import).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from rich.console import Console
    from rich.table import Table

    import fastattn

    quick = args.quick or args.device == "cpu"
    dtypes = [torch.float32, torch.bfloat16]
    table = Table(title=f"fastattn vs float64 reference on {args.device} (max abs error)")
    for col in ("op", "dtype", "PyTorch", *fastattn.available_backends(args.device)):
        table.add_column(col, justify="left" if col in ("op", "dtype") else "right")
    worst = 0.0
    for name, x, run, spec in _cases(args.device, quick):
        ref = spec(x.double())
        for dtype in dtypes:
            xd = x.to(dtype)
            pt_err = (spec(xd).double() - ref).abs().nan_to_num(0.0).max().item()
            cells = [name, str(dtype).removeprefix("torch."), f"{pt_err:.2e}"]
            for backend in fastattn.available_backends(args.device):
                with fastattn.use_backend(backend):
                    err = (run(fastattn, xd).double() - ref).abs().nan_to_num(0.0).max().item()
                worst = max(worst, err / max(pt_err, 1e-6))
                cells.append(f"{err:.2e}")
            table.add_row(*cells)
    console = Console()
    console.print(table)
    console.print(f"backends: {fastattn.backend_status(args.device)}")
    console.print("speed and memory: not measured here (the benchmark harness reports them)")
    return 0 if worst <= 4.0 else 1


if __name__ == "__main__":
    sys.exit(main())
