"""What a benchmark is made of: cases (one input shape and dtype of one op), providers (one
implementation of the op) and, per op, an :class:`OpBench` that knows its sweep, inputs,
float64 reference and work model. The per-op definitions live in ``fastattn/bench/<op>.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastattn.bench.work import MODES, Work

OP_NAMES = ("softmax", "cross_entropy", "attention", "model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not allowed; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Case:
    """One input configuration of one op: ``params`` (JSON-able, ordered) and a dtype name."""

    op: str
    params: tuple[tuple[str, object], ...]
    dtype: str

    @classmethod
    def make(cls, op: str, dtype: str, **params: object) -> Case:
        parse_dtype(dtype)
        return cls(op, tuple((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in params.items()), dtype)

    @property
    def p(self) -> dict[str, object]:
        return dict(self.params)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def name(self) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.params)

    def replace(self, **params: object) -> Case:
        return Case.make(self.op, self.dtype, **{**self.p, **params})

    def to_dict(self) -> dict:
        return {"op": self.op, "dtype": self.dtype,
                "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}}

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls.make(d["op"], d["dtype"], **d["params"])


def _fmt(v: object) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    return str(v)


@dataclass
class Provider:
    """One implementation of an op.

    ``make(case)`` returns a function taking the op's input tensors (in the provider's layout)
    and returning its output; ``unavailable(case, device)`` returns why it cannot run (None if
    it can). ``to_layout``/``from_layout`` convert inputs from and outputs (and gradients) back
    to the op's canonical layout, so layout changes are never inside the timed call.
    """

    name: str
    make: Callable[[Case], Callable[..., torch.Tensor]]
    unavailable: Callable[[Case, torch.device], str | None] = lambda case, device: None
    modes: tuple[str, ...] = MODES
    to_layout: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_layout: Callable[[torch.Tensor], torch.Tensor] | None = None
    scratch_bytes: Callable[[Case], int] = lambda case: 0
    kind: str = "pytorch"  # "fastattn", "pytorch" or "third-party"
    jit: bool = False  # its first call per op and dtype compiles (Numba): timed as compile_s


@dataclass
class Inputs:
    """The input tensors of one call and which of them are differentiated."""

    args: list[torch.Tensor]
    differentiable: Sequence[int] = field(default_factory=lambda: (0,))


class OpBench:
    """Base class of a per-op benchmark definition."""

    name: str = ""
    modes: tuple[str, ...] = MODES
    baseline: str = "torch"  # the provider speedups are measured against
    x_param: str = ""  # case parameter on the plots' x axis

    def sweep(self, device: torch.device, quick: bool, dtypes: Sequence[str]) -> list[Case]:
        raise NotImplementedError

    def inputs(self, case: Case, device: torch.device) -> Inputs:
        raise NotImplementedError

    def reference(self, case: Case, *args: torch.Tensor) -> torch.Tensor:
        """The specification, differentiable, in the dtype of ``args``."""
        raise NotImplementedError

    def work(self, case: Case, mode: str) -> Work:
        raise NotImplementedError

    def check_case(self, case: Case) -> Case:
        """A case small enough for a float64 reference that exercises the same row shapes."""
        return case

    def input_bytes(self, case: Case) -> int:
        """Bytes of inputs, outputs and gradients of one call (memory planning)."""
        raise NotImplementedError

    def providers(self) -> list[Provider]:
        raise NotImplementedError

    def label(self, case: Case) -> str:
        """A short name of the case for tables."""
        return f"{case.name} {case.dtype}"

    def series(self, case: Case) -> str:
        """The case parameters other than ``x_param``: one plot panel per series and mode."""
        return " ".join(f"{k}={_fmt(v)}" for k, v in case.params if k != self.x_param)


def get_op(name: str) -> OpBench:
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    return importlib.import_module(f"fastattn.bench.{name}").BENCH


def fastattn_providers(call: Callable[..., torch.Tensor], needs: str | None = None,
                       op: str | tuple[str, ...] | None = None) -> list[Provider]:
    """One provider per fastattn backend, each forcing its backend with ``use_backend``.

    ``call(fastattn_module, case, *args)`` calls the public function. ``needs`` names a
    ``fastattn`` attribute that must exist (ops still being written); ``op`` the fastattn op
    (``fastattn.backends.OPS``), or the ops, the call uses, since a backend may serve some ops
    and not others."""
    import fastattn
    from fastattn.backends import BACKENDS, backend_status

    def make_one(backend: str) -> Provider:
        def make(case: Case) -> Callable[..., torch.Tensor]:
            def fn(*args: torch.Tensor) -> torch.Tensor:
                with fastattn.use_backend(backend):
                    return call(fastattn, case, *args)
            return fn

        def unavailable(case: Case, device: torch.device) -> str | None:
            if needs is not None and not hasattr(fastattn, needs):
                return f"fastattn.{needs} does not exist in this checkout yet"
            for one in op if isinstance(op, tuple) else (op,):
                why = backend_status(device, one)[backend]
                if why is not None:
                    return why
            if backend == "triton" and device.type == "cpu":
                return "the Triton interpreter runs CPU tensors for tests; it is not timed"
            return None

        return Provider(f"fastattn-{backend}", make, unavailable, kind="fastattn",
                        jit=backend == "numba")

    return [make_one(b) for b in BACKENDS]


def compile_provider(eager: Callable[[Case], Callable[..., torch.Tensor]], **fields: object
                     ) -> Provider:
    """``torch.compile`` of an eager provider, compiled afresh for every case (static shapes)."""

    def make(case: Case) -> Callable[..., torch.Tensor]:
        # A fresh compile per case: dynamo's per-function recompile limit would otherwise
        # silently fall back to eager after a few shapes.
        torch._dynamo.reset()
        # Timing backward alone replays one forward graph (retain_graph=True), which compiled
        # backward graphs refuse when they donate their saved buffers.
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        return torch.compile(eager(case), dynamic=False)

    def unavailable(case: Case, device: torch.device) -> str | None:
        if device.type == "cuda":
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                return "torch.compile on CUDA needs triton"
        return None

    return Provider("torch.compile", make, unavailable, **fields)


def third_party(
    name: str,
    module: str,
    make: Callable[[Case], Callable[..., torch.Tensor]],
    *,
    check: Callable[[Case], str | None] | None = None,
    cuda_only: bool = True,
    **fields: object,
) -> Provider:
    """A provider from another library, skipped with the reason when ``module`` does not import
    or ``check(case)`` names a reason (a layout or option the library does not support)."""

    def unavailable(case: Case, device: torch.device) -> str | None:
        if cuda_only and device.type != "cuda":
            return f"{name} runs on CUDA only"
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
            return f"{module} does not import: {type(e).__name__}: {e}"
        return check(case) if check is not None else None

    return Provider(name, make, unavailable, kind="third-party", **fields)
