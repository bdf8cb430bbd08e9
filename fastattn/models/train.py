"""``fastattn-train``: train the reference GPT on the embedded corpus (or ``--data FILE``).

Runs with no arguments on a fresh machine (a small model, a few hundred steps on the CPU), and
unchanged under ``torchrun --nproc_per_node N`` with DistributedDataParallel (gloo on CPU, NCCL
on GPU): ``--batch-size`` is the global batch, split evenly over the processes, and every
process draws the same global batch (``fastattn.models.data``), so N processes train on exactly
the rows one process would. Progress shows loss and tokens per second; every ``--eval-every``
steps the held-out perplexity (exp of the mean token loss on the validation split) is reported.
``--out DIR`` keeps ``ckpt.pt`` (model, optimizer, step, config, RNG) and ``--resume`` continues
from it; ``--log-json FILE`` writes every step's metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import fastattn
from fastattn.models import data as data_mod
from fastattn.models.gpt import GPT, IMPLS, POSITIONS, GPTConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="UTF-8 text file (default: embedded corpus)")
    d.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    m = p.add_argument_group("model")
    m.add_argument("--block-size", type=int, default=128, help="context length")
    m.add_argument("--n-layer", type=int, default=4)
    m.add_argument("--n-head", type=int, default=4)
    m.add_argument("--n-kv-head", type=int, default=None, help="grouped-query heads")
    m.add_argument("--n-embd", type=int, default=128)
    m.add_argument("--pos", choices=POSITIONS, default="rope")
    m.add_argument("--dropout", type=float, default=0.0)
    r = p.add_argument_group("where it runs")
    r.add_argument("--impl", choices=IMPLS, default="fastattn",
                   help="fastattn ops, or plain PyTorch (the specification)")
    r.add_argument("--backend", choices=fastattn.backends.BACKENDS, default=None,
                   help="fastattn backend (default: fastattn's choice for the device)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=300)
    o.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    o.add_argument("--lr", type=float, default=3e-3)
    o.add_argument("--min-lr", type=float, default=3e-4)
    o.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    o.add_argument("--seed", type=int, default=1337)
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=int, default=100, help="0: only at the end")
    e.add_argument("--eval-batches", type=int, default=8)
    e.add_argument("--out", default=None, help="checkpoint directory")
    e.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    e.add_argument("--log-json", default=None, help="write per-step metrics to this file")
    e.add_argument("--sample", type=int, default=64, help="tokens to generate at the end")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace, world: int) -> None:
    for name in ("steps", "batch_size", "block_size", "vocab_size", "eval_batches"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.batch_size % world:
        p.error(f"--batch-size {a.batch_size} must be a multiple of the {world} processes")
    if a.resume and not a.out:
        p.error("--resume needs --out DIR")
    if a.vocab_size < 257:
        p.error("--vocab-size must be >= 257 (the 256 bytes plus merges)")


def _lr(a: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then cosine decay from --lr to --min-lr at the last step."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: GPT, a: argparse.Namespace) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))


class _Dist:
    """Rank, world size and device; sets up the process group when launched by torchrun."""

    def __init__(self, device: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            # Every rank arrives before any tears its connections down: a rank that destroyed
            # the group while the main rank was still saving made gloo abort the other process
            # at exit ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()


def _prepare_data(a: argparse.Namespace, env: _Dist) -> data_mod.TokenData:
    # The main process trains the tokenizer and fills the cache; the others then read it.
    if env.main:
        tokens = data_mod.prepare(a.data, a.vocab_size)
    env.barrier()
    if not env.main:
        tokens = data_mod.prepare(a.data, a.vocab_size)
    return tokens


@torch.no_grad()
def evaluate(model: GPT, tokens: data_mod.TokenData, a, env: _Dist, autocast) -> float:
    """Mean token loss on the fixed validation windows, averaged over all processes."""
    model.eval()
    losses = []
    for x, y in tokens.val_batches(a.eval_batches, a.batch_size, a.block_size, env.rank,
                                   env.world):
        with autocast:
            _, loss = model(x.to(env.device), y.to(env.device))
        losses.append(loss.item())
    model.train()
    return env.mean(sum(losses) / len(losses))


def _save(path: Path, model: GPT, optimizer, step: int, config: GPTConfig, records: list,
          a: argparse.Namespace, tokens: data_mod.TokenData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": config.to_dict(), "records": records, "rng": rng, "args": vars(a)},
               tmp)
    tmp.replace(path)  # a crash mid-save leaves the previous checkpoint intact
    tokens.tokenizer.save(str(path.parent / "tokenizer.json"))


def _progress(quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                    disable=quiet, transient=False)


def train(argv: list[str] | None = None) -> dict:
    """Run training; returns the final metrics (also the last record of ``--log-json``)."""
    parser = _parser()
    a = parser.parse_args(argv)
    env = _Dist(a.device)
    _check_args(parser, a, env.world)
    try:
        return _train(a, env)
    finally:
        env.close()


def _train(a: argparse.Namespace, env: _Dist) -> dict:
    torch.manual_seed(a.seed)
    tokens = _prepare_data(a, env)
    config = GPTConfig(vocab_size=tokens.vocab_size, block_size=a.block_size, n_layer=a.n_layer,
                       n_head=a.n_head, n_kv_head=a.n_kv_head, n_embd=a.n_embd, pos=a.pos,
                       dropout=a.dropout, impl=a.impl, backend=a.backend)
    model = GPT(config).to(env.device)
    optimizer = _optimizer(model, a)
    start, records = 0, []
    ckpt_path = Path(a.out) / "ckpt.pt" if a.out else None
    if a.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=env.device, weights_only=False)
        if ckpt["config"] != config.to_dict():
            raise SystemExit(f"{ckpt_path} was made with config {ckpt['config']}, not "
                             f"{config.to_dict()}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, records = ckpt["step"], ckpt["records"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    dtype = a.dtype or ("bfloat16" if env.device.type == "cuda" else "float32")
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else nullcontext())
    step_model = model
    if env.world > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if a.compile:
        step_model = torch.compile(step_model)
    if env.main and not a.quiet:
        print(f"fastattn-train: {model.num_params() / 1e6:.2f}M parameters, vocab "
              f"{config.vocab_size}, {len(tokens.train)} training tokens, device {env.device}, "
              f"{env.world} process(es), impl {a.impl}, backend "
              f"{a.backend or 'default'}, {dtype}", file=sys.stderr)
    tokens_per_step = a.batch_size * a.block_size
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    with _progress(a.quiet or not env.main) as bar:
        task = bar.add_task("train", total=a.steps, completed=start, status="")
        for step in range(start, a.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = _lr(a, step)
            x, y = tokens.batch(step, a.seed, a.batch_size, a.block_size, env.rank, env.world)
            with autocast:
                _, loss = step_model(x.to(env.device), y.to(env.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = None
            if a.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip).item()
            optimizer.step()
            loss_value = env.mean(loss.item())  # syncs the device, so the time below is real
            seconds = time.perf_counter() - t0
            record = {"step": step + 1, "loss": loss_value, "lr": _lr(a, step),
                      "grad_norm": norm, "tokens_per_s": tokens_per_step / seconds}
            if env.device.type == "cuda":  # the allocator's peak since the run started
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 1e9
            last = step + 1 == a.steps
            if (a.eval_every and (step + 1) % a.eval_every == 0) or last:
                val = evaluate(model, tokens, a, env, autocast)
                record.update(val_loss=val, val_ppl=math.exp(val))
            records.append(record)
            status = f"loss {loss_value:.3f}  {record['tokens_per_s']:,.0f} tok/s"
            if "val_ppl" in record:
                status += f"  val ppl {record['val_ppl']:.1f}"
                if not a.quiet and env.main:
                    bar.console.print(f"step {step + 1}: train loss {loss_value:.4f}, val loss "
                                      f"{record['val_loss']:.4f}, val perplexity "
                                      f"{record['val_ppl']:.2f}")
            bar.update(task, advance=1, status=status)
            if ckpt_path is not None and env.main and "val_loss" in record:
                _save(ckpt_path, model, optimizer, step + 1, config, records, a, tokens)
    if a.sample and env.main and not a.quiet:
        prompt = torch.tensor([tokens.train[:8].tolist()], device=env.device)
        with autocast:
            out = model.generate(prompt, a.sample, temperature=0.8, top_k=50)
        print("sample:", tokens.tokenizer.decode(out[0].tolist()), file=sys.stderr)
    if a.log_json and env.main:
        Path(a.log_json).write_text(json.dumps({"config": config.to_dict(), "args": vars(a),
                                                "world": env.world, "records": records}))
    return records[-1] if records else {}


def main(argv: list[str] | None = None) -> int:
    train(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now()
    return 0


def _exit_now() -> None:
    """End a torchrun worker whose run succeeded without the interpreter's finalisation.

    A gloo worker thread of the process group (which ``destroy_process_group`` does not stop:
    something in torch.distributed keeps the group alive) can still be dropping the last
    reference to a finished collective when the main thread returns. Its tensors' Python
    objects then need the GIL, and a thread that asks for it while the interpreter finalises
    is ended in a way that aborts the process ("terminate called without an active
    exception"; core dump: ``PyThread_exit_thread`` in ``take_gil`` under
    ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork``). It hit 3 torchrun runs in 120
    here (in CI's environment; 0 in 140 after). Everything this command writes is written and
    closed by now, so the worker flushes its streams and leaves with ``os._exit(0)``, before
    finalisation can start."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
