"""``fastattn-bench tune``: find the fastest backend per op and shape class on this device and
write the table :mod:`fastattn.backends` reads when no backend is requested.

Per op and shape class (``fastattn._tuned``: dtype and row length for softmax and
cross-entropy; dtype, head dim and key length for attention) one representative case is built
with the op's benchmark definition and run through the harness (:meth:`runner.Runner.run_case`):
every backend that may be chosen for the op on this device (:func:`fastattn.backends.candidates`;
never the Triton interpreter) is first checked against the float64 reference, forward and every
gradient, and only the ones that pass are timed, forward+backward (a training step), with the
harness's timers (CUDA events one backend after another; on a CPU the host clock with the
backends interleaved). The fastest median wins its class.

Representative cases: the row lengths 1024, 4096, 50257 (GPT-2's vocabulary) and 128256
(Llama-3's), one per row class, in ``2**20`` elements (``--quick``) or ``2**25``; attention is
causal, one per head dim (64, 128, 256) and key length (1024, 4096, 16384, 32768; ``--quick``:
512 and 2048 only, so the longer classes keep the fixed order), self-attention over 16k tokens
per batch (``--quick``: one sequence of two heads).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastattn import _tuned, backends
from fastattn.bench import runner
from fastattn.bench.suite import Case, OpBench, get_op

TUNED_OPS = ("softmax", "cross_entropy", "attention")
ROW_SIZES = (1024, 4096, 50257, 128256)  # one per row-length class
ELEMENTS = {True: 2**20, False: 2**25}  # logits or scores per case: quick, full
HEAD_DIMS = (64, 128, 256)
KEY_LENS = {True: (512, 2048), False: (1024, 4096, 16384, 32768)}
TOKENS = 16384  # attention batch = TOKENS // key length (full)
MODEL_DIM = 2048  # attention heads = MODEL_DIM // head dim (full)


def _size(case: Case) -> int | tuple[int, int]:
    p = case.p
    if case.op == "attention":
        return (p["head_dim"], p["seqlen"])
    return p["cols"] if case.op == "softmax" else p["vocab"]


def class_of(case: Case) -> str:
    """The shape class of ``case``."""
    return _tuned.shape_class(case.op, case.torch_dtype, _size(case))


def cases(op: str, quick: bool, dtypes: Sequence[str]) -> list[Case]:
    """One representative case per shape class of ``op`` measured by this sweep."""
    out = []
    for dtype in dtypes:
        if op == "attention":
            for head_dim in HEAD_DIMS:
                for seqlen in KEY_LENS[quick]:
                    heads = 2 if quick else MODEL_DIM // head_dim
                    batch = 1 if quick else max(1, TOKENS // seqlen)
                    out.append(Case.make(op, dtype, model=f"d{head_dim}", batch=batch,
                                         heads=heads, kv_heads=heads, head_dim=head_dim,
                                         seqlen=seqlen, causal=True))
        else:
            for cols in ROW_SIZES:
                rows = max(1, ELEMENTS[quick] // cols)
                if op == "softmax":
                    out.append(Case.make(op, dtype, rows=rows, cols=cols))
                else:
                    out.append(Case.make(op, dtype, tokens=rows, vocab=cols))
    return out


@dataclass
class Row:
    """The outcome of one shape class: each backend's median time or why it has none."""

    op: str
    cls: str
    label: str
    times_ms: dict[str, float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # backend -> status and reason
    failed: bool = False  # a backend disagreed with the reference or crashed

    @property
    def winner(self) -> str | None:
        return min(self.times_ms, key=self.times_ms.get) if self.times_ms else None


def measure(op: OpBench, case: Case, settings: runner.Settings) -> Row:
    """Check and time every candidate backend of ``op`` on ``case``."""
    row = Row(op.name, class_of(case), op.label(case))
    for r in runner.Runner(settings, None).run_case(op, case):
        name = r.provider.removeprefix("fastattn-")
        if r.status == "ok" and r.timing is not None:
            row.times_ms[name] = r.timing.median_ms
        else:
            row.problems[name] = f"{r.status}: {r.reason}"
            row.failed |= r.status == "failed"
    return row


def tune(device: torch.device, ops: Sequence[str], quick: bool, dtypes: Sequence[str], *,
         patterns: Sequence[str] | None = None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
         on_case: Callable[[str], None] | None = None) -> list[Row]:
    """Measure the classes of ``ops`` whose keys match one of ``patterns`` (all if None)."""
    rows = []
    for name in ops:
        op = get_op(name)
        settings = runner.Settings(
            device=device, quick=quick, dtypes=dtypes, warmup_ms=warmup_ms, rep_ms=rep_ms,
            memory="off", modes=["fwd_bwd"],
            providers=[f"fastattn-{b}" for b in backends.candidates(device, name)])
        for case in cases(name, quick, dtypes):
            if patterns is not None and not any(fnmatch.fnmatchcase(class_of(case), p)
                                                for p in patterns):
                continue
            if on_case is not None:
                on_case(f"{name} {class_of(case)}")
            rows.append(measure(op, case, settings))
    return rows


def table(device: torch.device, rows: Sequence[Row], command: str | None) -> dict:
    """The tuned table of ``rows``: per op, each class with a winner."""
    ops: dict[str, dict[str, dict]] = {}
    for row in rows:
        entries = ops.setdefault(row.op, {})
        if row.winner is not None:
            entries[row.cls] = {"backend": row.winner, "times_ms": dict(row.times_ms)}
    return _tuned.make(device, ops, command)
