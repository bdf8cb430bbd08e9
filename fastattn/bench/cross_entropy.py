"""Cross-entropy of ``(tokens, vocab)`` logits against class indices, mean reduction: the loss
of a language model's head. Memory-bound: reported in GB/s against the measured copy bandwidth.

Only ``fwd`` (inference: loss alone) and ``fwd_bwd`` (training: loss and logits gradient) are
timed. fastattn and Liger compute the gradient inside the forward kernel, so a backward timed
alone would compare a scale with a full pass.

The backward starts from the upstream gradient 1, as ``loss.backward()``. A case with
``loss_scale`` (one per sweep) multiplies the loss before backward, as gradient accumulation
(``loss / steps``) or a loss scaler does: kernels that made the gradient in forward must then
scale it, one more pass over the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fastattn.bench.suite import (
    Case,
    Inputs,
    OpBench,
    Provider,
    compile_provider,
    fastattn_providers,
    third_party,
)
from fastattn.bench.work import Work, cross_entropy_bytes

# Vocabularies of real tokenizers: Llama-2 32000, GPT-2 50257, Llama-3 128256, Gemma 256000;
# tokens = one 8k-token training micro-batch.
FULL_VOCABS = (32000, 50257, 128256, 256000)
FULL_TOKENS = 8192
QUICK_VOCABS = (4099, 50257)
QUICK_TOKENS = 32
MODES = ("fwd", "fwd_bwd")
LOSS_SCALE = 0.25  # loss / 4: four micro-batches of gradient accumulation


def _scaled(case: Case, loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss``, times the case's ``loss_scale`` when it has one."""
    scale = case.p.get("loss_scale")
    if scale is None:
        return loss
    return lambda logits, target: loss(logits, target) * scale


def _eager(case: Case) -> Callable[..., torch.Tensor]:
    return _scaled(case, lambda logits, target: F.cross_entropy(logits, target))


def _liger(case: Case) -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers.functional import liger_cross_entropy

    return _scaled(case, lambda logits, target: liger_cross_entropy(logits, target))


def _flash_attn(case: Case) -> Callable[..., torch.Tensor]:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses, _ = cross_entropy_loss(logits, target)  # per token; none ignored here
        return losses.mean()

    return _scaled(case, fn)


def _quack(case: Case) -> Callable[..., torch.Tensor]:
    from quack.cross_entropy import cross_entropy

    return _scaled(case,
                   lambda logits, target: cross_entropy(logits, target, reduction="mean"))


class CrossEntropyBench(OpBench):
    name = "cross_entropy"
    modes = MODES
    x_param = "vocab"

    def sweep(self, device: torch.device, quick: bool, dtypes: Sequence[str]) -> list[Case]:
        tokens, vocabs = (QUICK_TOKENS, QUICK_VOCABS) if quick else (FULL_TOKENS, FULL_VOCABS)
        cases = []
        for d in dtypes:
            cases += [Case.make("cross_entropy", d, tokens=tokens, vocab=v) for v in vocabs]
            cases.append(Case.make("cross_entropy", d, tokens=tokens, vocab=vocabs[1],
                                   loss_scale=LOSS_SCALE))
        return cases

    def label(self, case: Case) -> str:
        scale = case.p.get("loss_scale")
        scaled = "" if scale is None else f" loss*{scale:g}"
        return f"{case.p['tokens']}x{case.p['vocab']} {case.dtype}{scaled}"

    def inputs(self, case: Case, device: torch.device) -> Inputs:
        p = case.p
        logits = 3 * torch.randn(p["tokens"], p["vocab"], device=device)
        target = torch.randint(0, p["vocab"], (p["tokens"],), device=device)
        return Inputs([logits.to(case.torch_dtype), target], differentiable=(0,))

    def reference(self, case: Case, *args: torch.Tensor) -> torch.Tensor:
        from fastattn import reference

        return reference.cross_entropy(args[0], args[1]) * case.p.get("loss_scale", 1.0)

    def work(self, case: Case, mode: str) -> Work:
        p = case.p
        return cross_entropy_bytes(p["tokens"], p["vocab"], case.torch_dtype.itemsize, mode)

    def check_case(self, case: Case) -> Case:
        return case.replace(tokens=min(case.p["tokens"], 256))

    def input_bytes(self, case: Case) -> int:
        p = case.p
        # logits, their gradient, and one float32 row-sized temporary of eager PyTorch
        return p["tokens"] * p["vocab"] * (2 * case.torch_dtype.itemsize + 4)

    def providers(self) -> list[Provider]:
        return [
            *fastattn_providers(lambda f, case, logits, target: _scaled(
                case, f.cross_entropy)(logits, target), op="cross_entropy"),
            Provider("torch", _eager, modes=MODES),
            compile_provider(_eager),
            third_party("liger", "liger_kernel.transformers.functional", _liger, modes=MODES),
            third_party("flash-attn", "flash_attn.ops.triton.cross_entropy", _flash_attn,
                        modes=MODES),
            third_party("quack", "quack.cross_entropy", _quack, modes=MODES),
        ]


BENCH = CrossEntropyBench()
