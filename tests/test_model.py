"""The reference GPT: the fastattn path against the plain-PyTorch specification (forward, every
parameter's gradient, decoding with a cache, a few optimizer steps), torch.compile, and the
training CLI (loss falls on the embedded corpus, resume, torchrun parity)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from check import DEVICE, assert_twice_error, backends, skip_unsupported_attention

from fastattn.models import train as train_cli
from fastattn.models.gpt import GPT, GPTConfig

pytest.importorskip("tokenizers")

# One attention tile and a ragged remainder; GQA; every kind of position.
TINY = dict(vocab_size=67, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def _pair(backend, **overrides):
    """The same weights in the specification (pytorch) and through fastattn on ``backend``."""
    cfg = GPTConfig(**{**TINY, **overrides, "impl": "pytorch"})
    spec = GPT(cfg).to(DEVICE)
    ours = GPT(GPTConfig(**{**cfg.to_dict(), "impl": "fastattn", "backend": backend})).to(DEVICE)
    ours.load_state_dict(spec.state_dict())
    return spec, ours


def _tokens(batch, length, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (batch, length), device=DEVICE)


# Every position scheme, with and without grouped-query heads.
@pytest.mark.parametrize("pos,n_kv_head", [("rope", 2), ("learned", 4), ("sinusoidal", 1)])
@pytest.mark.parametrize("backend", backends("attention"))
def test_forward_and_every_gradient_match_specification(backend, pos, n_kv_head):
    skip_unsupported_attention(backend, torch.float32)
    spec, ours = _pair(backend, pos=pos, n_kv_head=n_kv_head)
    oracle = copy.deepcopy(spec).double()
    idx, targets = _tokens(2, 19), _tokens(2, 19)
    targets[0, :3] = -100  # ignored positions, as padding would be
    idx_before = idx.clone()
    results = [m(idx, targets) for m in (ours, spec, oracle)]
    assert torch.equal(idx, idx_before)
    (logits, loss), (pt_logits, pt_loss), (ref_logits, ref_loss) = results
    assert_twice_error(logits, ref_logits, pt_logits, "logits")
    assert_twice_error(loss, ref_loss, pt_loss, "loss")
    for _, each_loss in results:
        each_loss.backward()
    for (name, p), (_, p_pt), (_, p_ref) in zip(ours.named_parameters(), spec.named_parameters(),
                                                oracle.named_parameters(), strict=True):
        assert_twice_error(p.grad, p_ref.grad, p_pt.grad, f"d {name}")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=100, n_head=6)
    with pytest.raises(ValueError, match="pos"):
        GPTConfig(pos="alibi")
    with pytest.raises(ValueError, match="impl"):
        GPTConfig(impl="jax")
    with pytest.raises(ValueError, match="backend"):
        GPTConfig(backend="cudnn")
    with pytest.raises(ValueError, match="rotary"):
        GPTConfig(n_embd=30, n_head=2, pos="rope")
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="block_size"):
        model(_tokens(1, TINY["block_size"] + 1).cpu())


def _greedy_without_cache(model, idx, steps):
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


# Decoding with the cache is the same computation as re-running the whole prefix.
@pytest.mark.parametrize("backend", backends("attention"))
def test_generate_with_cache_matches_full_recompute(backend):
    skip_unsupported_attention(backend, torch.float64)
    spec, ours = _pair(backend)
    spec.double()
    if backend != "triton":  # the triton kernels have no float64 path
        ours.double()
    prompt = _tokens(2, 5)
    steps = 12  # 17 tokens: within block_size, so the cache is never refilled
    with torch.no_grad():
        expected = _greedy_without_cache(spec, prompt, steps)
    assert torch.equal(spec.generate(prompt, steps, temperature=0), expected)
    if backend != "triton":  # float64 both sides: the same tokens exactly
        assert torch.equal(ours.generate(prompt, steps, temperature=0), expected)
    # sampled: same generator seed, same tokens across implementations of one precision
    g1, g2 = (torch.Generator(DEVICE).manual_seed(3) for _ in range(2))
    a = spec.generate(prompt, 6, temperature=0.9, top_k=10, generator=g1)
    b = spec.generate(prompt, 6, temperature=0.9, top_k=10, generator=g2)
    assert torch.equal(a, b) and a.shape == (2, 11)


def test_generate_past_block_size_crops_context():
    model = GPT(GPTConfig(**{**TINY, "block_size": 8, "pos": "learned"},
                          backend="torch")).to(DEVICE).double()
    prompt = _tokens(1, 6)
    out = model.generate(prompt, 7, temperature=0)
    assert out.shape == (1, 13) and torch.equal(out[:, :6], prompt)
    # tokens 6..8 see the whole prefix (<= 8 tokens); then the full cache is refilled from the
    # last block_size // 2 = 4 tokens (positions 5..8), so tokens 9..12 see out[5:j]
    with torch.no_grad():
        for j in range(6, 13):
            start = 0 if j <= 8 else 5
            logits, _ = model(out[:, start:j])
            assert out[0, j] == logits[0, -1].argmax(), f"token {j}"


def test_compile_matches_eager():
    torch._dynamo.reset()
    _, ours = _pair("torch")
    idx, targets = _tokens(2, 13), _tokens(2, 13)
    compiled = torch.compile(ours, fullgraph=True)
    logits_c, loss_c = compiled(idx, targets)
    grads_c = torch.autograd.grad(loss_c, list(ours.parameters()))
    logits_e, loss_e = ours(idx, targets)
    grads_e = torch.autograd.grad(loss_e, list(ours.parameters()))
    torch.testing.assert_close(logits_c, logits_e)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def _steps(model, n, seed):
    """``n`` AdamW steps on fixed random batches; the loss before each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator(DEVICE).manual_seed(seed)
    losses = []
    for _ in range(n):
        idx = torch.randint(0, TINY["vocab_size"], (2, 16), device=DEVICE, generator=g)
        targets = torch.randint(0, TINY["vocab_size"], (2, 16), device=DEVICE, generator=g)
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# A few optimizer steps from the same seed: every backend follows the specification's losses.
@pytest.mark.parametrize("backend", backends("attention"))
def test_training_steps_match_specification(backend):
    skip_unsupported_attention(backend, torch.float32)
    spec, ours = _pair(backend, dropout=0.0)
    seed = int(torch.randint(0, 2**31, ()).item())
    expected = _steps(spec, 3, seed)
    got = _steps(ours, 3, seed)
    assert got[0] != got[-1]  # the steps did change the model
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-5, atol=2e-5)


# --- the training CLI ------------------------------------------------------------------------

@pytest.fixture
def text_file(tmp_path, monkeypatch):
    """A small corpus (English prose from the embedded corpus) and a private tokenizer cache."""
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path / "cache"))
    from fastattn.models.data import default_corpus

    path = tmp_path / "text.txt"
    path.write_text(default_corpus(max_chars=60_000), encoding="utf-8")
    return path


CLI_MODEL = ["--vocab-size", "300", "--block-size", "16", "--n-layer", "1", "--n-head", "2",
             "--n-embd", "32", "--batch-size", "4", "--quiet", "--sample", "0",
             "--backend", "torch"]


def _records(path):
    return json.loads(path.read_text())["records"]


def test_loss_falls_on_embedded_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path / "cache"))
    log = tmp_path / "log.json"
    train_cli.main(["--vocab-size", "512", "--block-size", "32", "--n-layer", "2",
                    "--n-embd", "64", "--batch-size", "8", "--steps", "60", "--eval-every", "0",
                    "--eval-batches", "4", "--quiet", "--sample", "0", "--backend", "torch",
                    "--log-json", str(log)])
    records = _records(log)
    first, last = records[0]["loss"], records[-1]
    # ln(512) = 6.24 at random init; a bigram-level model is well below 5 after 60 steps
    assert first > 5.8 and last["loss"] < first - 1.0 and last["val_loss"] < first - 1.0
    assert last["val_ppl"] == pytest.approx(torch.tensor(last["val_loss"]).exp().item())


def test_resume_continues_the_same_run(text_file, tmp_path):
    base = CLI_MODEL + ["--data", str(text_file), "--eval-every", "2"]
    straight, resumed = tmp_path / "a.json", tmp_path / "b.json"
    train_cli.main(base + ["--steps", "4", "--log-json", str(straight)])
    out = tmp_path / "ckpt"
    train_cli.main(base + ["--steps", "2", "--out", str(out)])
    assert (out / "ckpt.pt").exists() and (out / "tokenizer.json").exists()
    train_cli.main(base + ["--steps", "4", "--out", str(out), "--resume",
                           "--log-json", str(resumed)])
    a, b = _records(straight), _records(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--resume"])
    assert "--resume needs --out" in capsys.readouterr().err


# torchrun with two gloo processes reaches the losses of one process on the same global batch.
def test_torchrun_two_processes_match_one(text_file, tmp_path):
    args = CLI_MODEL + ["--data", str(text_file), "--steps", "3", "--eval-every", "3",
                        "--device", "cpu"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    train_cli.main(args + ["--log-json", str(one)])
    # PYTHONFAULTHANDLER: a rank that crashes prints every Python thread's stack. (Gloo's
    # teardown used to abort a rank, 3 runs in 120, after training had finished: see
    # fastattn.models.train._exit_now.)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastattn.models.train", *args, "--log-json", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
    a, b = _records(one), _records(two)
    assert json.loads(two.read_text())["world"] == 2
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5)


@pytest.mark.skipif("triton" not in backends("attention"), reason="needs the triton backend")
def test_backend_switch_reaches_the_ops():
    """``backend`` in the config reaches every call: triton has no float64 attention and says
    so (never a silent fallback), while the same float64 model runs on the torch backend."""
    idx = _tokens(1, 4)
    model = GPT(GPTConfig(**TINY, backend="triton")).to(DEVICE).double()
    with pytest.raises(TypeError, match="triton attention kernel has no float64 path"):
        model(idx)
    model.config.backend = "torch"
    logits, _ = model(idx)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
