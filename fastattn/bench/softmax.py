"""Softmax along the last dim of a ``(rows, cols)`` matrix: rows of attention scores and of
vocabulary logits. Memory-bound: reported in GB/s against the measured copy bandwidth."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastattn.bench.suite import (
    Case,
    Inputs,
    OpBench,
    Provider,
    compile_provider,
    fastattn_providers,
    third_party,
)
from fastattn.bench.work import Work, softmax_bytes

# Row lengths from attention-score rows (1k-16k keys) to vocabularies (GPT-2 50257, Llama-3
# 128256, Gemma 256000): the kernel regimes "one block", "many blocks" and "longer than SRAM".
FULL_COLS = (1024, 4096, 16384, 50257, 128256, 256000)
FULL_ROWS = 4096
QUICK_COLS = (4096, 50257)
QUICK_ROWS = 64


def _eager(case: Case) -> Callable[..., torch.Tensor]:
    return lambda x: torch.softmax(x, -1)


def _quack(case: Case) -> Callable[..., torch.Tensor]:
    from quack.softmax import softmax

    return softmax


def _liger(case: Case) -> Callable[..., torch.Tensor]:
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply


class SoftmaxBench(OpBench):
    name = "softmax"
    x_param = "cols"

    def sweep(self, device: torch.device, quick: bool, dtypes: Sequence[str]) -> list[Case]:
        rows, cols = (QUICK_ROWS, QUICK_COLS) if quick else (FULL_ROWS, FULL_COLS)
        return [Case.make("softmax", d, rows=rows, cols=c) for d in dtypes for c in cols]

    def label(self, case: Case) -> str:
        return f"{case.p['rows']}x{case.p['cols']} {case.dtype}"

    def inputs(self, case: Case, device: torch.device) -> Inputs:
        p = case.p
        x = 3 * torch.randn(p["rows"], p["cols"], device=device)
        return Inputs([x.to(case.torch_dtype)])

    def reference(self, case: Case, *args: torch.Tensor) -> torch.Tensor:
        from fastattn import reference

        return reference.softmax(args[0], -1)

    def work(self, case: Case, mode: str) -> Work:
        p = case.p
        return softmax_bytes(p["rows"], p["cols"], case.torch_dtype.itemsize, mode)

    def check_case(self, case: Case) -> Case:
        return case.replace(rows=min(case.p["rows"], 64))

    def input_bytes(self, case: Case) -> int:
        p = case.p
        return 4 * p["rows"] * p["cols"] * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        return [
            *fastattn_providers(lambda f, case, x: f.softmax(x, -1), op="softmax"),
            Provider("torch", _eager),
            compile_provider(_eager),
            third_party("quack", "quack.softmax", _quack),
            third_party("liger", "liger_kernel.ops.softmax", _liger),
        ]


BENCH = SoftmaxBench()
