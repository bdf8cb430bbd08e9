"""One training step of the reference GPT (``fastattn.models.gpt``): tokens in, mean loss out,
and the gradient of every parameter. Reported in TFLOPS of the model's training FLOPs (6 per
parameter per token plus attention, PaLM's count): against the measured matmul ceiling that is
the model FLOPs utilisation (MFU). Tokens per second are ``tokens / seconds`` of the same row.

The parameters are the differentiable inputs of the call (``torch.func.functional_call``), so
the harness checks the loss and every parameter's gradient against the plain-PyTorch model in
float64 before it times anything, and the timed backward computes every weight gradient, as a
training step does. Providers: the model with ``impl="fastattn"`` on each fastattn backend,
``impl="pytorch"`` eager (the specification; attention is PyTorch's SDPA) and compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from fastattn.bench.suite import (
    Case,
    Inputs,
    OpBench,
    Provider,
    compile_provider,
    fastattn_providers,
)
from fastattn.bench.work import Work

# GPT-2 small at 1k and 4k context (the training runs), 16k tokens per step.
FULL = [dict(layers=12, heads=12, kv_heads=12, embd=768, vocab=50257, batch=16, seq=1024),
        dict(layers=12, heads=12, kv_heads=12, embd=768, vocab=50257, batch=4, seq=4096)]
QUICK = [dict(layers=2, heads=4, kv_heads=2, embd=128, vocab=4099, batch=4, seq=128)]
MODES = ("fwd", "fwd_bwd")


def _config(case: Case, impl: str):
    from fastattn.models.gpt import GPTConfig

    p = case.p
    return GPTConfig(vocab_size=p["vocab"], block_size=p["seq"], n_layer=p["layers"],
                     n_head=p["heads"], n_kv_head=p["kv_heads"], n_embd=p["embd"],
                     impl=impl)


def _skeleton(case: Case, impl: str) -> torch.nn.Module:
    """The model's modules on the meta device: its parameters come in as call arguments."""
    from fastattn.models.gpt import GPT

    with torch.device("meta"):
        return GPT(_config(case, impl))


@functools.lru_cache(maxsize=16)
def _caller(case: Case, impl: str) -> Callable[..., torch.Tensor]:
    """``step(*params, idx, targets) -> loss`` of the model with ``impl``; fastattn's backend is
    whatever ``use_backend`` says around the call. Cached: the timed call builds nothing."""
    skeleton = _skeleton(case, impl)
    names = [name for name, _ in skeleton.named_parameters()]
    buffers: dict[tuple, dict[str, torch.Tensor]] = {}

    def step(*args: torch.Tensor) -> torch.Tensor:
        *params, idx, targets = args
        key = (idx.device, params[0].dtype)
        if key not in buffers:  # position tables, made once per device and dtype
            buffers[key] = dict(_model(case, impl, *key).named_buffers())
        state = {**dict(zip(names, params, strict=True)), **buffers[key]}
        _, loss = torch.func.functional_call(skeleton, state, (idx, targets), tie_weights=True)
        return loss

    return step


def _model(case: Case, impl: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from fastattn.models.gpt import GPT

    with torch.device(device):
        model = GPT(_config(case, impl))
    return model.to(dtype)


class ModelBench(OpBench):
    name = "model"
    modes = MODES
    x_param = "seq"

    def sweep(self, device: torch.device, quick: bool, dtypes: Sequence[str]) -> list[Case]:
        shapes = QUICK if quick else FULL
        return [Case.make("model", d, **s) for d in dtypes for s in shapes]

    def label(self, case: Case) -> str:
        p = case.p
        return (f"L{p['layers']} H{p['heads']}/{p['kv_heads']} C{p['embd']} V{p['vocab']} "
                f"{p['batch']}x{p['seq']} {case.dtype}")

    def inputs(self, case: Case, device: torch.device) -> Inputs:
        p = case.p
        model = _model(case, "pytorch", device, case.torch_dtype)
        params = [t.detach() for _, t in model.named_parameters()]
        idx = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=device)
        targets = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=device)
        return Inputs([*params, idx, targets], differentiable=tuple(range(len(params))))

    def reference(self, case: Case, *args: torch.Tensor) -> torch.Tensor:
        return _caller(case, "pytorch")(*args)

    def work(self, case: Case, mode: str) -> Work:
        p = case.p
        per_token = _skeleton(case, "pytorch").flops_per_token(p["seq"])  # forward + backward
        tokens = p["batch"] * p["seq"]
        return Work(per_token * tokens / (3 if mode == "fwd" else 1), "flop")

    def check_case(self, case: Case) -> Case:
        # the same layer shapes on fewer layers and tokens, so float64 on the device is cheap
        return case.replace(layers=min(case.p["layers"], 2), batch=1,
                            seq=min(case.p["seq"], 256))

    def input_bytes(self, case: Case) -> int:
        p = case.p
        params = _skeleton(case, "pytorch").num_params()
        tokens = p["batch"] * p["seq"]
        # weights and their gradients, the logits and their gradient in float32, and about
        # 16 saved activations of width embd per layer and token
        return (2 * params * case.torch_dtype.itemsize + 2 * tokens * p["vocab"] * 4
                + 16 * p["layers"] * tokens * p["embd"] * case.torch_dtype.itemsize)

    def providers(self) -> list[Provider]:
        # each forces its backend with use_backend around the call
        fa = fastattn_providers(lambda f, case, *args: _caller(case, "fastattn")(*args),
                                op=("attention", "cross_entropy"))
        for provider in fa:
            provider.modes = MODES
        return [*fa, Provider("torch", lambda case: _caller(case, "pytorch"), modes=MODES),
                compile_provider(lambda case: _caller(case, "pytorch"), modes=MODES)]


BENCH = ModelBench()
