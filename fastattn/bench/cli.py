"""``fastattn-bench``: benchmark every op on every provider of this device, gate regressions,
and tune the backend choice.

    fastattn-bench                         # quick suite on CPU, full sweep on a GPU
    fastattn-bench --ops softmax --json out.json --csv out.csv --plot plots/
    fastattn-bench compare BASE.json NEW.json
    fastattn-bench tune --quick            # fastest backend per op and shape class -> cache

Exit status of a run: 0, or 1 when a fastattn provider disagreed with the reference or failed
(other providers' failures are reported, not fatal). ``compare``: 0 pass, 1 regression,
2 refused (different devices, unreadable files, nothing in common). ``tune``: 0, or 1 when a
backend disagreed with the reference or failed (it is never chosen; the table is written).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch

from fastattn.bench.suite import DTYPES, OP_NAMES
from fastattn.bench.work import MODES


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None


def _positive(name: str):
    def parse(text: str) -> float:
        value = _number(name, text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value
    return parse


def _fraction(name: str):
    def parse(text: str) -> float:
        value = _number(name, text)
        if not 0 <= value < 10:
            raise argparse.ArgumentTypeError(
                f"{name} must be a fraction >= 0 (0.1 = 10% slower), got {text!r}")
        return value
    return parse


def _choices(name: str, allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{name}: {', '.join(bad) or 'empty'} not allowed; choose from "
                f"{', '.join(allowed)} (comma-separated)")
        return items
    return parse


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a device; use cpu or cuda"
                                         ) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and (
            device.index >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(
            f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _add_sweep_arguments(p: argparse.ArgumentParser, ops: Sequence[str], *, quick: str,
                         full: str) -> None:
    """--ops (from ``ops``), --device, --quick/--full (described by ``quick``/``full``) and
    --dtypes: what the sweep and ``tune`` share."""
    p.add_argument("--ops", type=_choices("--ops", ops), default=list(ops),
                   help=f"comma-separated ops (default: all of {', '.join(ops)})")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None, help=quick)
    size.add_argument("--full", dest="quick", action="store_false", help=full)
    p.add_argument("--dtypes", type=_choices("--dtypes", list(DTYPES)), default=None,
                   help="comma-separated (default: bfloat16 on CUDA, float32 on CPU)")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastattn-bench",
        description="Benchmark fastattn against PyTorch and other kernels on this device "
                    "(subcommands: 'fastattn-bench compare BASE.json NEW.json', "
                    "'fastattn-bench tune').")
    _add_sweep_arguments(p, OP_NAMES, quick="small sweep (the default on CPU)",
                         full="model-sized sweep (the default on CUDA), shrunk to fit memory")
    p.add_argument("--modes", type=_choices("--modes", MODES), default=None,
                   help="comma-separated subset of fwd,bwd,fwd_bwd (default: all)")
    p.add_argument("--providers", default=None,
                   help="comma-separated glob patterns of providers to run, e.g. "
                        "'fastattn-*,torch' (default: all)")
    p.add_argument("--warmup-ms", type=_positive("--warmup-ms"), default=25.0,
                   help="warm-up budget per timing, ms (default 25)")
    p.add_argument("--rep-ms", type=_positive("--rep-ms"), default=100.0,
                   help="measurement budget per timing, ms (default 100)")
    p.add_argument("--budget-s", type=_positive("--budget-s"), default=None,
                   help="wall-clock budget for the whole sweep, split evenly over the ops; "
                        "cases past it are reported as skipped")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays (still flushing L2 between calls)")
    p.add_argument("--no-flush-l2", dest="flush_l2", action="store_false",
                   help="do not flush L2 between timed calls")
    p.add_argument("--memory", choices=("auto", "all", "off"), default="auto",
                   help="peak-memory measurement: all results, off, or auto (all on CUDA; on "
                        "CPU only fwd_bwd of each op's largest case, each in a subprocess)")
    p.add_argument("--remeasure-ceilings", action="store_true",
                   help="measure the bandwidth/matmul ceilings again instead of the cache")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the inputs (default 0)")
    p.add_argument("--json", metavar="PATH", help="write the full results (raw samples) here")
    p.add_argument("--csv", metavar="PATH", help="write one row per result here")
    p.add_argument("--plot", metavar="DIR", help="write one PNG per op here (needs matplotlib)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--list", action="store_true",
                   help="list the providers of the selected ops and whether each can run on "
                        "this device (for the sweep's first case), then exit")
    return p


def list_providers(ops: Sequence[str], device: torch.device, quick: bool,
                   dtypes: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(op, provider, kind, "available" or the reason it is not) for each provider."""
    from fastattn.bench.suite import get_op

    rows = []
    for name in ops:
        op = get_op(name)
        case = op.sweep(device, quick, dtypes)[0]
        for p in op.providers():
            why = p.unavailable(case, device)
            rows.append((name, p.name, p.kind, "available" if why is None else why))
    return rows


def compare_parser() -> argparse.ArgumentParser:
    from fastattn.bench.compare import DEFAULT_GEOMEAN, DEFAULT_PER_KERNEL

    p = argparse.ArgumentParser(prog="fastattn-bench compare",
                                description="Fail on a performance regression from BASE to NEW.")
    p.add_argument("base", metavar="BASE.json")
    p.add_argument("new", metavar="NEW.json")
    p.add_argument("--threshold", type=_fraction("--threshold"), default=DEFAULT_PER_KERNEL,
                   help=f"per-kernel slowdown allowed (default {DEFAULT_PER_KERNEL})")
    p.add_argument("--geomean-threshold", type=_fraction("--geomean-threshold"),
                   default=DEFAULT_GEOMEAN,
                   help=f"geometric-mean slowdown allowed (default {DEFAULT_GEOMEAN})")
    p.add_argument("--all-providers", action="store_true",
                   help="gate every provider, not only fastattn's")
    p.add_argument("--allow-different-devices", action="store_true",
                   help="compare files measured on different devices anyway")
    return p


def compare_main(argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastattn.bench import compare, report

    args = compare_parser().parse_args(argv)
    console = Console()
    try:
        base, new = report.load(args.base), report.load(args.new)
        v = compare.compare(base, new, per_kernel=args.threshold,
                            geomean=args.geomean_threshold,
                            allow_different_devices=args.allow_different_devices,
                            all_providers=args.all_providers)
    except ValueError as e:
        console.print(f"[red]compare refused:[/red] {e}")
        return 2
    table = Table(title=f"{args.new} vs {args.base}", title_justify="left")
    for col in ("kernel", "base", "new", "new/base", "verdict"):
        table.add_column(col, justify="left" if col in ("kernel", "verdict") else "right")
    for row in v.rows:
        table.add_row(row["key"], f"{row['base_ms']:.4g} ms",
                      "-" if row["new_ms"] is None else f"{row['new_ms']:.4g} ms",
                      "-" if row["ratio"] is None else f"{row['ratio']:.3f}", row["verdict"])
    console.print(table)
    if v.geomean is not None:
        console.print(f"geometric mean new/base: {v.geomean:.3f} over "
                      f"{sum(r['ratio'] is not None for r in v.rows)} kernels")
    for key in v.only_in_base:
        console.print(f"only in BASE: {key}")
    for key in v.only_in_new:
        console.print(f"only in NEW: {key}")
    for problem in v.problems:
        console.print(f"[red]REGRESSION[/red] {problem}")
    console.print("[green]no regression[/green]" if v.ok else "[red]regression[/red]")
    return 0 if v.ok else 1


def tune_parser() -> argparse.ArgumentParser:
    from fastattn.bench.tune import TUNED_OPS

    p = argparse.ArgumentParser(
        prog="fastattn-bench tune",
        description="Time every fastattn backend per op and shape class on this device (forward "
                    "+ backward, after the float64 check) and write the fastest per class to "
                    "the table fastattn reads when no backend is requested.")
    _add_sweep_arguments(
        p, TUNED_OPS, quick="small cases, attention keys up to 4096 only (the default on CPU)",
        full="model-sized cases, every class (the default on CUDA)")
    p.add_argument("--classes", default=None,
                   help="comma-separated glob patterns of shape classes to measure, e.g. "
                        "'float32/cols<=1024,*/d<=128/*' (default: all)")
    p.add_argument("--warmup-ms", type=_positive("--warmup-ms"), default=None,
                   help="warm-up budget per timing, ms (default 10 with --quick, else 25)")
    p.add_argument("--rep-ms", type=_positive("--rep-ms"), default=None,
                   help="measurement budget per backend, ms (default 40 with --quick, else 100)")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="write the table here instead of the cache file fastattn reads")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the inputs (default 0)")
    return p


def _sweep_settings(args: argparse.Namespace) -> tuple[torch.device, bool, list[str]]:
    """The device (made current when CUDA), quick or full, and dtypes of a sweep or a tune run,
    with their per-device defaults; seeds torch with ``--seed``."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = (device.type == "cpu") if args.quick is None else args.quick
    dtypes = args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    return device, quick, dtypes


def _patterns(parser: argparse.ArgumentParser, flag: str, text: str | None,
              known: Callable[[], list[str]], no_match: str) -> list[str] | None:
    """The comma-separated glob patterns of ``flag`` (None when not given); each must match one
    of ``known()``, else the parser exits naming the flag, the patterns and ``no_match``."""
    if text is None:
        return None
    patterns = [x.strip() for x in text.split(",") if x.strip()]
    if not patterns:
        parser.error(f"{flag}: give at least one pattern")
    names = known()
    unmatched = [pat for pat in patterns if not fnmatch.filter(names, pat)]
    if unmatched:
        parser.error(f"{flag}: {', '.join(unmatched)} {no_match}: {', '.join(names)}")
    return patterns


def tune_main(argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastattn import _tuned, backends
    from fastattn.bench import env, tune

    parser = tune_parser()
    args = parser.parse_args(argv)
    device, quick, dtypes = _sweep_settings(args)
    patterns = _patterns(
        parser, "--classes", args.classes,
        lambda: [tune.class_of(c) for op in args.ops for c in tune.cases(op, quick, dtypes)],
        "matches no class this sweep measures; they are")
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    default = {op: backends.fixed_order(device.type, op) for op in args.ops}
    console.print(f"fastattn-bench tune on [bold]{_tuned.device_name(device)}[/bold] ({device}), "
                  f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
                  f"{'quick' if quick else 'full'}, dtypes {','.join(dtypes)}; "
                  f"fixed-order default: "
                  f"{', '.join(f'{op} {name}' for op, name in default.items())}")
    started = time.monotonic()
    rows = tune.tune(device, args.ops, quick, dtypes, patterns=patterns,
                     warmup_ms=args.warmup_ms or (10.0 if quick else 25.0),
                     rep_ms=args.rep_ms or (40.0 if quick else 100.0),
                     on_case=lambda text: console.print(f"[dim]{text}[/dim]"))
    names = [b for b in backends.BACKENDS
             if any(b in r.times_ms or b in r.problems for r in rows)]
    out = Table(title=f"median forward+backward per shape class on {device}",
                title_justify="left")
    for col in ("op", "class", "case", *names, "winner", "vs fixed order"):
        out.add_column(col, justify="left" if col in ("op", "class", "case", "winner")
                       else "right")
    for r in rows:
        cells = [f"{r.times_ms[b]:.4g} ms" if b in r.times_ms
                 else r.problems.get(b, "-").split(":")[0] for b in names]
        fixed = default[r.op]
        speedup = (f"{r.times_ms[fixed] / r.times_ms[r.winner]:.2f}x"
                   if r.winner is not None and fixed in r.times_ms else "-")
        out.add_row(r.op, r.cls, r.label, *cells, r.winner or "none", speedup)
    console.print(out)
    for r in rows:
        for b, why in r.problems.items():
            console.print(f"[yellow]{r.op} {r.cls} {b}[/yellow] {why}")
    argv_full = [sys.argv[0] if sys.argv else "fastattn-bench", "tune", *argv]
    read_here = _tuned.path_for(device)
    path = _tuned.write(tune.table(device, rows, env.command_line(argv_full)),
                        args.out or read_here)
    backends.reload_tuned()
    console.print(f"wrote {path} in {time.monotonic() - started:.0f} s")
    if path.resolve() != read_here.resolve():
        console.print(f"fastattn reads {read_here}, not this file")
    return 1 if any(r.failed for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if argv[:1] == ["tune"]:
        return tune_main(argv[1:])
    return run_main(argv)


def run_main(argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fastattn.bench import ceilings, env, report, runner

    parser = run_parser()
    args = parser.parse_args(argv)
    device, quick, dtypes = _sweep_settings(args)

    def known_providers() -> list[str]:
        from fastattn.bench.suite import get_op

        return sorted({p.name for op in args.ops for p in get_op(op).providers()})

    providers = _patterns(parser, "--providers", args.providers, known_providers,
                          f"matches no provider of {', '.join(args.ops)}; known providers")
    if args.list:
        from rich.table import Table

        table = Table(title=f"providers on {device}", title_justify="left")
        for col in ("op", "provider", "kind", "status"):
            table.add_column(col, overflow="fold")
        for row in list_providers(args.ops, device, quick, dtypes):
            table.add_row(*row)
        Console().print(table)
        return 0
    # Wide tables when writing to a file or CI log (rich assumes 80 columns there).
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 180)
    argv_full = [sys.argv[0] if sys.argv else "fastattn-bench", *argv]
    environment = env.environment(device, argv_full)
    v = environment["versions"]
    console.print(f"fastattn-bench on [bold]{environment['device']['name']}[/bold] ({device}), "
                  f"torch {v['torch']}, CUDA {v['cuda']}, triton {v['triton']}, "
                  f"commit {str(environment['git']['commit'])[:12]}"
                  f"{' (dirty)' if environment['git']['dirty'] else ''}; "
                  f"{'quick' if quick else 'full'} sweep, dtypes {','.join(dtypes)}")
    ceil = ceilings.get(device, use_cache=not args.remeasure_ceilings)
    console.print(f"ceilings ({ceil['source']}): copy {ceil['bandwidth_gbs']:.4g} GB/s, "
                  f"bf16 matmul {ceil['matmul_bf16_tflops']:.4g} TFLOPS, "
                  f"fp32 matmul {ceil['matmul_fp32_tflops']:.4g} TFLOPS")
    memory_mode = {"auto": "all" if device.type == "cuda" else "largest"}.get(args.memory,
                                                                               args.memory)
    settings = runner.Settings(
        device=device, quick=quick, dtypes=dtypes, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
        flush_l2=args.flush_l2, cuda_graph=args.cuda_graph, memory=memory_mode,
        budget_s=args.budget_s, providers=providers, modes=args.modes)
    # A time limit's SIGTERM stops the sweep like Ctrl-C: what was measured is still written.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    started = time.monotonic()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True,
                      disable=not args.progress) as progress:
            task = progress.add_task("planning", total=None)

            def on_case(text: str) -> None:
                progress.update(task, description=text[:70])
                progress.advance(task)

            run = runner.Runner(settings, ceil, on_case)
            plan = run.plan(args.ops)
            progress.update(task, total=sum(len(cases) for _, cases in plan) + 1)
            progress.advance(task)
            results = [r.to_dict() for r in run.run(plan)]
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    settings_dict = {"device": str(device), "quick": quick, "dtypes": list(dtypes),
                     "ops": list(args.ops), "modes": args.modes, "providers": providers,
                     "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                     "flush_l2": args.flush_l2, "cuda_graph": args.cuda_graph,
                     "memory": memory_mode, "budget_s": args.budget_s, "seed": args.seed,
                     "elapsed_s": elapsed, "interrupted": run.interrupted}
    # The block sizes the attention autotuner picked in this run, per kernel and tuning key.
    tuned = sys.modules.get("fastattn.triton.attention")
    settings_dict["attention_autotuned"] = tuned.autotuned_configs() if tuned else {}
    if run.interrupted:
        console.print("[yellow]interrupted: writing the results measured so far[/yellow]")
    tables, notes = report.tables(results, host_clock=device.type != "cuda")
    for t in tables:
        console.print(t)
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    doc = report.document(environment, settings_dict, ceil, results, argv_full)
    if args.json:
        console.print(f"wrote {report.write_json(doc, args.json)}")
    if args.csv:
        console.print(f"wrote {report.write_csv(results, args.csv)}")
    if args.plot:
        try:
            for path in report.plot(results, ceil, args.plot):
                console.print(f"wrote {path}")
        except ImportError as e:
            console.print(f"[yellow]--plot skipped: matplotlib is not installed ({e})[/yellow]")
    bad = [r for r in results if r["kind"] == "fastattn" and r["status"] in ("failed", "oom")]
    for r in run.log:
        if os.environ.get("FASTATTN_BENCH_DEBUG"):
            console.print(r)
    console.print(f"done in {elapsed:.0f} s: {sum(r['status'] == 'ok' for r in results)} timed, "
                  f"{sum(r['status'] == 'failed' for r in results)} failed, "
                  f"{sum(r['status'] == 'skipped' for r in results)} skipped")
    return 1 if bad or run.interrupted else 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
