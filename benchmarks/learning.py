"""How well do bit-level models learn? Held-out bits per byte under one wall-clock budget.

Trains, on the same corpus and split and for the same number of minutes each:

* ``flat``   bitlm's one-position-per-bit model,
* ``framed`` bitlm's byte-frame model with a local bit predictor (``--local`` picks which),
* ``byte``   a plain 256-symbol next-byte transformer written here as the reference point,
             with the same backbone blocks, width and depth,

and prints held-out bits per byte for each beside what general-purpose compressors achieve on
the held-out text given the training text (compressed size of train + held-out minus
compressed size of train), plus the share of words in a 500-byte sample of each model that
occur in the training text.

The learning-rate schedule runs on elapsed time (warm-up, then cosine to 10% at the budget), so
every model finishes its schedule whatever its speed. One torch thread per model.

    python benchmarks/learning.py --corpus ../shared/corpora/shakespeare.txt.gz --minutes 10
    python benchmarks/learning.py --minutes 1 --models framed,byte      # a quick look
    python benchmarks/learning.py --models framed,byte --jobs 2         # both at once, 1 core each
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitlm_core.builtins.corpora import FileCorpus, QuickstartCorpus  # noqa: E402
from bitlm_core.builtins.encoders import Parity9Encoder  # noqa: E402
from bitlm_core.model import BitTransformerLM, Block, ModelConfig  # noqa: E402
from bitlm_core.registry import get_registry  # noqa: E402
from bitlm_core.app.generate import generate  # noqa: E402
from bitlm_core.app.textstats import vocabulary, word_share  # noqa: E402

LN2 = math.log(2.0)


# -- the byte-level reference model ------------------------------------------------------------
class ByteLM(nn.Module):
    """A plain next-byte transformer: byte embedding, the same blocks as bitlm, 256-way head."""

    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        C = cfg.d_model
        self.cfg = cfg
        self.emb = nn.Embedding(257, C)  # 256 bytes + BOS
        self.pos = nn.Embedding(cfg.max_frames, C)
        self.blocks = nn.ModuleList(Block(cfg, backend) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, 256)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x):  # x (B, T) bytes -> (B, T, 256) logits of each byte
        inp = torch.cat([torch.full_like(x[:, :1], 256), x[:, :-1]], dim=1)
        h = self.emb(inp) + self.pos(torch.arange(x.size(1)))
        for block in self.blocks:
            h, _ = block(h, True)
        return self.head(self.ln_f(h))

    @torch.no_grad()
    def sample(self, prompt: bytes, n: int, generator, temperature: float = 0.8) -> bytes:
        out = list(prompt)
        for _ in range(n):
            ctx = torch.tensor([out[-self.cfg.max_frames + 1:] + [0]])
            probs = torch.softmax(self(ctx)[0, -1] / temperature, dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=generator)))
        return bytes(out[len(prompt):])


# -- data ----------------------------------------------------------------------------------------
def load_corpus(path: str | None) -> bytes:
    return QuickstartCorpus().read() if path is None else FileCorpus(path).read()


def compressor_figures(train: bytes, held: bytes) -> dict[str, float]:
    codecs = {"gzip -9": lambda b: gzip.compress(b, 9),
              "bzip2 -9": lambda b: bz2.compress(b, 9),
              "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)}
    return {name: 8 * (len(c(train + held)) - len(c(train))) / len(held)
            for name, c in codecs.items()}


# -- training ------------------------------------------------------------------------------------
def lr_at(frac: float, lr: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if frac < warmup:
        return lr * max(frac, 1e-3) / warmup
    p = min(1.0, (frac - warmup) / (1 - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_model(kind: str, args, backend):
    enc = Parity9Encoder()
    if kind == "byte":
        cfg = ModelConfig(layout="framed", frame_bits=9, max_frames=args.seq, d_model=args.d,
                          n_layers=args.layers, n_heads=args.heads, d_ff=4 * args.d)
        return ByteLM(cfg, backend)
    seq = args.flat_seq if kind == "flat" else args.seq
    cfg = ModelConfig(layout=kind, frame_bits=enc.frame_bits, frame_parity=args.parity_support,
                      max_frames=seq, d_model=args.d,
                      n_layers=args.layers, n_heads=args.heads, d_ff=4 * args.d,
                      local=args.local, local_dim=args.local_dim or args.d)
    return BitTransformerLM(cfg, backend)


def window_loss(kind: str, model, windows: np.ndarray) -> torch.Tensor:
    """Mean bits per byte of a batch of byte windows (B, T)."""
    if kind == "byte":
        x = torch.from_numpy(windows).long()
        return F.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1)) / LN2
    enc = Parity9Encoder()
    bits = torch.from_numpy(np.stack([enc.encode_np(w.tobytes()) for w in windows]))
    logits = model(bits)
    return F.cross_entropy(logits.reshape(-1, 2).float(), bits.reshape(-1).long()) * 9 / LN2


def log_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_one(kind: str, args, train: np.ndarray, held: np.ndarray, vocab: set[bytes],
              log) -> dict:
    torch.set_num_threads(args.threads)  # again: a --jobs worker is a fresh process
    torch.manual_seed(args.seed)
    backend = get_registry().build("attention", args.attention, {}, "attention")
    model = make_model(kind, args, backend)
    seq = args.flat_seq if kind == "flat" else args.seq
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                            betas=(0.9, 0.99))
    rng = np.random.default_rng(args.seed)
    budget = 60 * args.minutes
    start, steps, seen = time.perf_counter(), 0, 0
    while True:
        elapsed = time.perf_counter() - start
        frac = steps / args.steps if args.steps else elapsed / budget
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, args.lr)
        starts = rng.integers(0, len(train) - seq, args.batch)
        loss = window_loss(kind, model, np.stack([train[s:s + seq] for s in starts]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        seen += args.batch * seq
        if steps % 50 == 0:
            log(f"  {kind:>6} step {steps:>5}  {elapsed:6.0f}s  train {loss.item():.3f} bpb")
    train_seconds = time.perf_counter() - start
    model.eval()
    n_windows = min(len(held) // seq, args.eval_bytes // seq)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n_windows, 16):
            rows = [held[s * seq:(s + 1) * seq] for s in range(i, min(i + 16, n_windows))]
            total += window_loss(kind, model, np.stack(rows)).item() * len(rows)
    bpb = total / n_windows
    gen = torch.Generator().manual_seed(args.seed)
    if kind == "byte":
        text = model.sample(b"\n", args.sample_bytes, gen)
    else:
        sampler = get_registry().build("sampler", "autoregressive", {"temperature": 0.8})
        text = generate(model, Parity9Encoder(), sampler, "\n", args.sample_bytes,
                        seed=args.seed).text[1:].encode()
    return {"model": kind, "params": sum(p.numel() for p in model.parameters()),
            "steps": steps, "train_seconds": train_seconds, "bytes_seen": seen,
            "held_out_bpb": bpb, "eval_bytes": n_windows * seq,
            "word_share": word_share(text, vocab) or 0.0, "sample": text.decode("utf-8", "replace")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", help="text file (.gz ok); default: the quickstart corpus")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    p.add_argument("--steps", type=int, default=0,
                   help="train each model this many steps instead of --minutes (a step-matched "
                        "comparison; the schedule then runs on steps)")
    p.add_argument("--models", default="flat,framed,byte")
    p.add_argument("--local", default="joint", help="framed model's local predictor")
    p.add_argument("--local-dim", type=int, default=256, help="its width (0: --d)")
    p.add_argument("--parity-support", action=argparse.BooleanOptionalAction, default=True,
                   help="framed, joint: score only parity-valid frames (as bitlm run does)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--held-out", type=float, default=0.05)
    p.add_argument("--seq", type=int, default=128, help="window in bytes (framed, byte)")
    p.add_argument("--flat-seq", type=int, default=64, help="window in bytes (flat)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-bytes", type=int, default=128 * 1024,
                   help="score at most this many held-out bytes (from its start)")
    p.add_argument("--sample-bytes", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many models at once, each in its own process (use at most "
                        "one per core, or the budgets are not comparable)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_corpus(args.corpus)
    n_held = int(len(data) * args.held_out)
    train_b, held_b = data[:-n_held], data[-n_held:]
    vocab = vocabulary(train_b)
    train = np.frombuffer(train_b, dtype=np.uint8)
    held = np.frombuffer(held_b, dtype=np.uint8)
    log = log_line
    log(f"corpus {args.corpus or 'quickstart'}: {len(train_b):,} training bytes, "
        f"{len(held_b):,} held out; {args.steps or args.minutes} {'steps' if args.steps else 'min'} "
        f"per model")
    kinds = args.models.split(",")
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(kinds)), mp.get_context("spawn")) as pool:
            futures = [pool.submit(train_one, kind, args, train, held, vocab, log)
                       for kind in kinds]
            results = [f.result() for f in futures]
    else:
        results = [train_one(kind, args, train, held, vocab, log) for kind in kinds]
    comp = compressor_figures(train_b, held_b)

    name = Path(args.corpus).name if args.corpus else "quickstart"
    budget = f"{args.steps:,} steps" if args.steps else f"{args.minutes:g} min"
    print(f"\n{name}: held-out bits per byte after {budget} of training each "
          f"(1 thread; held-out = last {args.held_out:.0%}; models scored on its first "
          f"{min(r['eval_bytes'] for r in results):,}+ bytes, compressors on all of it)\n")
    print("| model | params | steps | bytes seen | held-out bpb | words in training text |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        label = f"framed ({args.local})" if r["model"] == "framed" else r["model"]
        print(f"| {label} | {r['params']:,} | {r['steps']:,} | {r['bytes_seen']:,} | "
              f"{r['held_out_bpb']:.3f} | {r['word_share']:.0%} |")
    for cname, v in comp.items():
        print(f"| {cname} | | | | {v:.3f} | |")
    for r in results:
        print(f"\n{r['model']} sample: {r['sample'][:300]!r}")


if __name__ == "__main__":
    main()
