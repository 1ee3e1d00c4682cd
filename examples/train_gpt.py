"""Train a small GPT whose attention is an attnc pattern, next to the same GPT on torch SDPA.

Two models are built from one seed with identical weights and fed identical batches in the same
order. Model A computes attention with a compiled attnc kernel, ``kern(q, k, v)`` (forward and
backward are attnc's Triton kernels); model B calls
``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kern.mask(N, N))``, the dense
boolean mask of the same pattern. Both loss curves are printed (and plotted with ``--plot``); since
the two attentions compute the same function, the curves must agree up to floating-point noise.

The default pattern is a causal Longformer: a sliding window of ``--window`` keys plus ``--globals``
global tokens (compare examples/longformer.attn), compiled from the source string below.

The data is made here, from the seed, with no download: a character-level corpus drawn from a
procedural "language" with several topics. Every topic has its own lexicon of invented words and
every training sequence starts with ``--globals`` header tokens naming its topic. Spelling and
word boundaries are local (the sliding window sees them); which lexicon is in use is stated only in
the header, which every position can see through the global tokens.

    # CPU, Triton interpreter (this script sets TRITON_INTERPRET=1), about 1.2 s a step, 40 s in all:
    python examples/train_gpt.py --toy --device cpu --plot toy.png
    # one GPU: seq 4096, dim 512, 8 heads of 64, 6 layers, bf16 autocast, 300 steps:
    python examples/train_gpt.py --size gpu --plot gpu.png

Any preset value can be overridden: ``--steps``, ``--seq``, ``--layers``, ``--dim``, ``--heads``,
``--batch``, ``--window``, ``--globals``, ``--lr``, ``--bf16/--no-bf16`` and ``--threads`` (torch's
CPU threads: 1 in the toy preset, 0 for torch's default). ``--pattern`` takes another pattern (a
``.attn`` path or source text, with ``-p NAME=VALUE`` for its parameters); it must need no runtime
inputs and leave every query at least one key, since SDPA turns a fully masked row into NaN where
attnc returns 0.
"""

# ---- before anything imports triton ------------------------------------------------------------
# Triton reads TRITON_INTERPRET when it is imported. On CPU the attnc kernels run only through the
# interpreter (without it, kern(q, k, v) falls back to the plain-torch reference), so the variable
# is set here, before torch, triton or attnc are imported.
import os
import sys


def _device_in_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    _device = _device_in_argv(sys.argv[1:])
    if _device is None:
        import torch  # importing torch does not import triton

        _device = "cuda" if torch.cuda.is_available() else "cpu"
    if _device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"

# ---- the rest of the imports ---------------------------------------------------------------------
import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import attnc  # noqa: E402
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import attnc  # noqa: E402

# A causal sliding window of w keys before each query, plus g global tokens that see every earlier
# key and are seen by every later query (prelude: causal, window, global_tokens).
DEFAULT_PATTERN = """
pattern causal_longformer(w: int = 256, g: int = 16) {
    mask causal and (window(w) or global_tokens(g))
}
"""

PRESETS = {
    # Tiny, for the Triton interpreter on CPU: 2 heads of D = 16.
    # The interpreter runs one Triton program at a time, each costing tens of milliseconds whatever
    # its size, so the batch is 1: a step is then 4 programs per kernel and layer.
    # One CPU thread: the ops are tiny, and extra torch threads only wait for each other (badly so
    # on a busy machine).
    "toy": dict(steps=30, seq=64, layers=2, dim=32, heads=2, batch=1, window=16, globals=4, lr=1e-2,
                bf16=False, threads=1),
    # One GPU: 8 heads of D = 64.
    "gpu": dict(steps=300, seq=4096, layers=6, dim=512, heads=8, batch=8, window=256, globals=16,
                lr=1.5e-3, bf16=True, threads=0),
}

HEAD_DIMS = (16, 32, 64, 128, 256)   # what attnc's kernels support


# ================================================================================================
# Data: a procedural character-level corpus with topics
# ================================================================================================

TEXT_CHARS = " .abcdefghijklmnopqrstuvwxyz"
N_TOPICS = 8
VOCAB = len(TEXT_CHARS) + N_TOPICS          # the text characters, then one header token per topic


def _invent_word(rng: np.random.Generator) -> str:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = []
    for _ in range(int(rng.integers(1, 4))):
        s = consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
        if rng.random() < 0.25:
            s += consonants[rng.integers(len(consonants))]
        syllables.append(s)
    return "".join(syllables)


def make_corpus(chars_per_topic: int, seed: int) -> list[np.ndarray]:
    """One token array per topic: sentences of words from a shared list and the topic's lexicon."""
    rng = np.random.default_rng(seed)
    shared = [_invent_word(rng) for _ in range(12)]
    code = {c: i for i, c in enumerate(TEXT_CHARS)}
    corpus = []
    for _ in range(N_TOPICS):
        lexicon = [_invent_word(rng) for _ in range(48)]
        zipf = 1.0 / np.arange(1, len(lexicon) + 1)
        zipf /= zipf.sum()
        parts, length = [], 0
        while length < chars_per_topic:
            n = int(rng.integers(3, 10))
            own = rng.choice(len(lexicon), size=n, p=zipf)
            common = rng.integers(len(shared), size=n)
            pick_shared = rng.random(n) < 0.3
            words = [shared[c] if s else lexicon[o] for o, c, s in zip(own, common, pick_shared)]
            sentence = " ".join(words) + ". "
            parts.append(sentence)
            length += len(sentence)
        text = "".join(parts)[:chars_per_topic]
        corpus.append(np.frombuffer(text.encode(), dtype=np.uint8).copy())
    lut = np.zeros(256, dtype=np.int64)
    for c, i in code.items():
        lut[ord(c)] = i
    return [lut[a] for a in corpus]


class Batches:
    """Seeded batches of seq + 1 tokens: ``globals`` header tokens of a topic, then its text."""

    def __init__(self, corpus: list[np.ndarray], seq: int, batch: int, n_header: int, seed: int):
        self.corpus, self.seq, self.batch, self.n_header = corpus, seq, batch, n_header
        self.rng = np.random.default_rng(seed)

    def next(self) -> torch.Tensor:
        body = self.seq + 1 - self.n_header
        rows = []
        for topic in self.rng.integers(N_TOPICS, size=self.batch):
            text = self.corpus[topic]
            start = int(self.rng.integers(0, len(text) - body + 1))
            header = np.full(self.n_header, len(TEXT_CHARS) + topic, dtype=np.int64)
            rows.append(np.concatenate([header, text[start:start + body]]))
        return torch.from_numpy(np.stack(rows))


# ================================================================================================
# Model: token embedding, pre-norm blocks (attention + MLP), rotary positions, tied head
# ================================================================================================

@dataclass
class Config:
    vocab: int
    seq: int
    layers: int
    dim: int
    heads: int


class Rotary(nn.Module):
    def __init__(self, head_dim: int, seq: int, base: float = 10000.0):
        super().__init__()
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: (B, H, N, D)
        n = x.shape[-2]
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = self.cos[:n], self.sin[:n]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.out = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x, attend, rotary):
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q), rotary(k)
        y = attend(q.to(v.dtype), k.to(v.dtype), v)                     # (B, H, N, D)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: Config, attend):
        super().__init__()
        self.attend = attend                    # (q, k, v) -> out, all (B, H, N, D)
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.rotary = Rotary(cfg.dim // cfg.heads, cfg.seq)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("proj.weight", "out.weight"))    # scaled as in GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers) if residual else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for block in self.blocks:
            x = block(x, self.attend, self.rotary)
        logits = F.linear(self.ln_f(x), self.tok.weight)               # head tied to the embedding
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ================================================================================================
# Training
# ================================================================================================

def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available (cpu runs the kernels under TRITON_INTERPRET=1)")
    p.add_argument("--size", choices=sorted(PRESETS), default=None,
                   help="preset (default: gpu on cuda, toy on cpu); the flags below override it")
    p.add_argument("--toy", action="store_const", const="toy", dest="size", help="same as --size toy")
    for name, kind in (("steps", int), ("seq", int), ("layers", int), ("dim", int), ("heads", int),
                       ("batch", int), ("window", int), ("globals", int), ("lr", float), ("threads", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (on in the gpu preset)")
    p.add_argument("--pattern", default=None,
                   help="a .attn file or pattern source (default: causal sliding window + global tokens)")
    p.add_argument("--pattern-name", default=None, help="which pattern, when --pattern defines several")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of --pattern (int, float or bool)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None,
                   help="print every N steps (default: about 20 lines)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write both loss curves to this PNG")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the curves, timings and settings to this JSON file")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.size is None:
        args.size = "gpu" if args.device == "cuda" else "toy"
    for key, value in PRESETS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dim % args.heads or args.dim // args.heads not in HEAD_DIMS:
        p.error(f"--dim / --heads must be a head dim attnc supports {HEAD_DIMS}, got {args.dim}/{args.heads}")
    if not 0 <= args.globals <= args.seq or args.window < 0 or args.steps < 1:
        p.error("need 0 <= --globals <= --seq, --window >= 0 and --steps >= 1")
    if args.pattern is None and args.param:
        p.error("-p sets parameters of --pattern; the default pattern takes --window and --globals")
    if args.log_every is None:
        args.log_every = max(1, args.steps // 20)
    return args


def _literal(text: str):
    """A -p value as the attnc command line reads it (int, float or bool)."""
    from attnc.cli import _parse_value
    return _parse_value(text)


def compile_pattern(args) -> "attnc.Kernel":
    if args.pattern is None:
        return attnc.compile(DEFAULT_PATTERN, w=args.window, g=args.globals)
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"-p expects NAME=VALUE, got {item!r}")
        params[name.strip()] = _literal(value.strip())
    kern = attnc.compile(args.pattern, pattern=args.pattern_name, **params)
    if kern.inputs:
        raise SystemExit(f"pattern {kern.name} needs runtime inputs ({', '.join(kern.inputs)}); "
                         "this example supports patterns without inputs")
    return kern


def run(args) -> dict:
    """Train both models; return the curves, timings and settings."""
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("warning: TRITON_INTERPRET is not set, so on CPU kern(q, k, v) runs attnc's plain-torch "
              "reference instead of the Triton kernels", file=sys.stderr)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)          # --threads 0: torch's default
    kern = compile_pattern(args)
    mask = kern.mask(args.seq, args.seq).to(device)                      # (1, 1, N, N) bool, True = visible
    if not bool(mask.any(-1).all()):
        raise SystemExit("the pattern leaves some query without keys; SDPA would return NaN there")
    density = mask.float().mean().item()

    def attend_attnc(q, k, v):
        return kern(q, k, v)

    def attend_sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    cfg = Config(vocab=VOCAB, seq=args.seq, layers=args.layers, dim=args.dim, heads=args.heads)
    torch.manual_seed(args.seed)
    model_a = GPT(cfg, attend_attnc).to(device)
    model_b = GPT(cfg, attend_sdpa).to(device)
    model_b.load_state_dict(model_a.state_dict())                      # identical initial weights
    models = {"attnc": model_a, "sdpa": model_b}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
            for name, m in models.items()}
    n_params = sum(p.numel() for p in model_a.parameters())

    chars = max(20_000, 4 * (args.seq + 1))
    batches = Batches(make_corpus(chars, args.seed), args.seq, args.batch, args.globals, args.seed + 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        where = "attnc falls back to its plain-torch reference"
    else:
        where = "Triton interpreter"
    print(f"attnc {attnc.__version__} | torch {torch.__version__} | device {device} ({where})")
    label = f"{kern.name}({', '.join(f'{k}={v}' for k, v in kern.params.items())})"
    print(f"pattern {label}: {density:.1%} of the {args.seq}x{args.seq} scores visible")
    print(f"model: {args.layers} layers, dim {args.dim}, {args.heads} heads of {args.dim // args.heads}, "
          f"{n_params / 1e6:.2f}M parameters, vocab {VOCAB}; batch {args.batch} x seq {args.seq}, "
          f"{args.steps} steps, lr {args.lr}, {'bf16 autocast' if args.bf16 else 'float32'}")
    print(f"{'step':>6} {'attnc':>9} {'sdpa':>9} {'|diff|':>9}   ms/step attnc  sdpa")

    losses = {name: [] for name in models}
    times = {name: [] for name in models}
    started = time.perf_counter()
    for step in range(args.steps):
        batch = batches.next().to(device)
        idx, targets = batch[:, :-1], batch[:, 1:]
        for name, model in models.items():
            opt = opts[name]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                loss = model(idx, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            a, b = losses["attnc"][-1], losses["sdpa"][-1]
            print(f"{step:>6} {a:>9.4f} {b:>9.4f} {abs(a - b):>9.2e}   "
                  f"{1e3 * times['attnc'][-1]:>13.1f} {1e3 * times['sdpa'][-1]:>5.1f}")
    elapsed = time.perf_counter() - started

    a, b = np.array(losses["attnc"]), np.array(losses["sdpa"])
    diff = np.abs(a - b)
    skip = min(5, args.steps - 1)          # the first steps include compiling the kernels
    result = dict(
        settings={k: v for k, v in vars(args).items() if k not in ("plot", "json")},
        pattern=label, density=density, n_params=n_params, config=asdict(cfg),
        loss_attnc=a.tolist(), loss_sdpa=b.tolist(),
        max_abs_diff=float(diff.max()), max_rel_diff=float((diff / np.abs(b)).max()),
        ms_per_step={name: 1e3 * statistics.median(t[skip:]) for name, t in times.items()},
        seconds=elapsed,
    )
    return result


def plot(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = np.array(result["loss_attnc"]), np.array(result["loss_sdpa"])
    steps = np.arange(len(a))
    s = result["settings"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[3, 2]))
    ms = result["ms_per_step"]
    ax1.plot(steps, a, color="tab:blue", lw=2.2, label=f"attnc kernel ({ms['attnc']:.1f} ms/step)")
    ax1.plot(steps, b, color="tab:orange", lw=1.2, ls="--",
             label=f"SDPA + dense mask ({ms['sdpa']:.1f} ms/step)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/char)")
    ax1.set_title(f"{result['pattern']}, {result['density']:.1%} of scores visible\n"
                  f"seq {s['seq']}, batch {s['batch']}, {s['layers']} layers, dim {s['dim']}, "
                  f"{s['heads']} heads, "
                  f"{'bf16' if s['bf16'] else 'fp32'}, {s['device']}", fontsize=9)
    ax1.legend()
    ax1.grid(alpha=0.3)
    diff = np.abs(a - b)
    if (diff > 0).any():
        ax2.semilogy(steps, np.where(diff > 0, diff, np.nan), color="tab:red", marker=".", lw=1)
    else:
        ax2.plot(steps, diff, color="tab:red", marker=".", lw=1)
    ax2.set_xlabel("step")
    ax2.set_title(f"|loss attnc - loss SDPA|, max {result['max_abs_diff']:.2e} (zeros not drawn)", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    a, b = result["loss_attnc"][-1], result["loss_sdpa"][-1]
    ms = result["ms_per_step"]
    print(f"trained {len(result['loss_attnc'])} steps in {result['seconds']:.1f} s; "
          f"median ms/step attnc {ms['attnc']:.1f}, sdpa {ms['sdpa']:.1f}")
    print(f"final loss attnc {a:.5f} vs sdpa {b:.5f} (|diff| {abs(a - b):.2e}); "
          f"max |diff| over the curve {result['max_abs_diff']:.2e} "
          f"(max relative {result['max_rel_diff']:.2e})")
    return result


if __name__ == "__main__":
    main()
