"""Stage 7: the user-facing compiled kernel — compile(), cache, launch, torch op and autograd."""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from pathlib import Path

import torch

from . import ir
from .analyze import PatternIR, Program, lower_pattern
from .errors import InputError, PatternError
from .reference import dense_mask, reference_attention
from .validate import check_inputs, check_qkv, check_scale, check_sizes


def _source_key(source_or_path) -> tuple:
    """In-process memo key: source text, or a file path with its modification time."""
    text = str(source_or_path)
    if isinstance(source_or_path, Path) or ("\n" not in text and "{" not in text and Path(text).is_file()):
        p = Path(text).resolve()
        return ("path", str(p), p.stat().st_mtime_ns)
    return ("text", text, 0)


@functools.lru_cache(maxsize=256)
def _lower_cached(key: tuple, pattern, params: tuple) -> PatternIR:
    kind, text, _ = key
    program = Program(Path(text) if kind == "path" else text)
    return lower_pattern(program, pattern, dict(params))


def compile(source_or_path, pattern: str | None = None, **params) -> "Kernel":
    """Compile a pattern (a ``.attn`` path or source text) with its parameters bound.

    ``pattern`` chooses one when the file defines several. Raises :class:`attnc.PatternSyntaxError` or
    :class:`attnc.PatternError` for mistakes in the source or parameters.
    """
    if isinstance(source_or_path, (bytes, bytearray)):
        try:
            source_or_path = bytes(source_or_path).decode("utf-8")
        except UnicodeDecodeError as e:
            raise PatternError(f"pattern source bytes are not UTF-8 text: {e}") from None
    pir = _lower_cached(_source_key(source_or_path), pattern, tuple(sorted(params.items())))
    return Kernel(pir)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_warned_cpu = False

MASK_LIMIT = 1 << 33    # entries of the largest dense mask kern.mask builds (8 GiB of bools)


class Kernel:
    """A compiled attention pattern: callable like attention, plus its mask, reference, plan and source."""

    def __init__(self, pir: PatternIR):
        from .ops import ops_for
        self.ir = pir
        self.name = pir.name
        self.params = dict(pir.params)
        self.inputs = dict(pir.inputs)
        # The kernel's torch custom operators are registered now, not on the first call: a call traced by
        # torch.compile then only reads this name (a constant), whatever the torch version's tracer can do.
        self._op_name = f"fwd_{ops_for(self).key}"

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"<attnc.Kernel {self.name}({params})>"

    # ---- copies and pickles ------------------------------------------------------------------------
    # A compiled kernel never changes (its caches only remember work already done), so copies of a model
    # that holds one (an EMA copy, an evaluation copy) share it. A pickle holds the analyzed pattern (not
    # the source, whose file or imports may be gone), and loading it makes a kernel with empty caches.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (Kernel, (self.ir,))

    # ---- semantics -------------------------------------------------------------------------------
    @property
    def ir_text(self) -> str:
        """The optimized IR as a person reads it (``attnc compile --emit ir``)."""
        from .irprint import format_pattern_ir
        return format_pattern_ir(self.ir)

    def mask(self, n_q: int, n_k: int, batch: int = 1, heads: int = 1, **inputs) -> torch.Tensor:
        """The mask as a dense bool tensor (batch, heads, n_q, n_k): the pattern's exact semantics."""
        n_q, n_k, batch, heads = check_sizes(n_q=n_q, n_k=n_k, batch=batch, heads=heads)
        entries = batch * heads * n_q * n_k
        if entries > MASK_LIMIT:
            raise InputError(f"kern.mask({n_q}, {n_k}, batch={batch}, heads={heads}) would hold {entries:.3g} "
                             f"entries (at most {MASK_LIMIT:.3g}); kern.plan(...) describes large sizes by tiles")
        first = next((name for name, t in inputs.items() if isinstance(t, torch.Tensor)), None)
        device = inputs[first].device if first is not None else None
        sizes = check_inputs(self.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k, device=device,
                             device_of=f"input '{first}'")
        return dense_mask(self.ir, n_q, n_k, batch, heads, sizes, inputs, device)

    def reference(self, q, k, v, scale: float | None = None, return_lse: bool = False, **inputs):
        """Plain-torch attention with this pattern (float32 math; float64 for float64 inputs)."""
        shapes = check_qkv(q, k, v)
        sizes = check_inputs(self.ir, inputs, batch=shapes.batch, heads=shapes.heads_q, n_q=shapes.n_q,
                             n_k=shapes.n_k, device=q.device)
        scale = check_scale(scale, shapes.head_dim)
        return reference_attention(self.ir, q, k, v, scale=scale, sizes=sizes, inputs=inputs,
                                   return_lse=return_lse)

    def __call__(self, q, k, v, scale: float | None = None, return_lse: bool = False, **inputs):
        """Attention with this pattern: Triton kernels on CUDA (or under TRITON_INTERPRET=1)."""
        global _warned_cpu
        if not isinstance(q, torch.Tensor):
            check_qkv(q, k, v)          # an InputError saying what q must be
        if q.device.type != "cuda" and q.device.type != "meta" and not _interpreting():
            if not _warned_cpu:
                warnings.warn("attnc: CPU tensors without TRITON_INTERPRET=1 run the plain-torch reference "
                              "(slow); use CUDA tensors for the Triton kernels", stacklevel=2)
                _warned_cpu = True
            return self.reference(q, k, v, scale=scale, return_lse=return_lse, **inputs)
        from .launch import attention
        return attention(self, q, k, v, scale=scale, return_lse=return_lse, inputs=inputs)

    # ---- generated code ----------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The generated Triton source of the forward kernel, readable and commented."""
        from .codegen import render_forward
        from .launch import cached_source
        return cached_source(self.ir, "fwd", render_forward)[0]

    def _module(self, kind: str, mode: str | None = None):
        """The loaded generated module of ``kind`` ('fwd', 'bwd', or 'setup': the tile classifier),
        optionally in another plan mode."""
        modules = self.__dict__.setdefault("_modules", {})
        if (kind, mode) not in modules:
            from .codegen import render_backward, render_forward, render_setup
            from .launch import cached_source, load_module
            if kind == "setup":
                render = lambda pir, mode: render_setup(pir)          # noqa: E731 (one variant per pattern)
            else:
                render = render_forward if kind == "fwd" else render_backward
            tag = kind if mode is None else f"{kind}-{mode}"
            _, path = cached_source(self.ir, tag, lambda pir: render(pir, mode))
            modules[(kind, mode)] = load_module(path)
        return modules[(kind, mode)]

    def _forward_module(self, mode: str | None = None):
        return self._module("fwd", mode)

    def _backward_module(self, mode: str | None = None):
        return self._module("bwd", mode)

    @property
    def backward_source(self) -> str:
        """The generated Triton source of the backward kernels."""
        from .codegen import render_backward
        from .launch import cached_source
        return cached_source(self.ir, "bwd", render_backward)[0]

    @property
    def setup_source(self) -> str | None:
        """The generated Triton source of the per-call setup kernels (sort keys, block summaries, tile
        classifier) of a pattern with runtime inputs or a layout transform; None for closed-form plans."""
        from .codegen import kernel_mode, render_setup
        from .launch import cached_source
        if kernel_mode(self.ir) == "ranges":
            return None
        return cached_source(self.ir, "setup", render_setup)[0]

    # ---- planning ----------------------------------------------------------------------------------
    def block_sizes(self, head_dim: int = 128, device: str = "cuda", n_q: int = 8192,
                    n_k: int | None = None) -> tuple[int, int]:
        """(block_m, block_n) of the default forward configuration for a GPU (or the interpreter) at
        these lengths (narrow bands run on smaller tiles, see ``launch.prefers_small_tiles``).

        Without a GPU this is the Hopper table's choice (what `kern.plan` reports by default)."""
        from .codegen import tile_gathers
        from .launch import forward_config, forward_table, prefers_small_tiles
        sparse = prefers_small_tiles(self, n_q, n_q if n_k is None else n_k)
        gathers = tile_gathers(self.ir)
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            cfg = forward_table(head_dim, head_dim, torch.bfloat16, 9, sparse, gathers)
        else:
            cfg = forward_config(head_dim, head_dim, dev, torch.bfloat16, sparse=sparse, gathers=gathers)
        return cfg.block_m, cfg.block_n

    def _input_cached(self, key: tuple, inputs: dict, build, materialize):
        """Setup (tile lists, layouts) cached per call shape and runtime-input tensors.

        The entry keys on the input tensors' identity plus version counter and holds them by weak
        reference: an input modified in place is re-planned, a new tensor is never mistaken for a freed
        one whose memory it reuses, a model reusing one document mask in every layer plans once, and an
        entry whose inputs are gone is dropped (nothing can ask for it again). A miss runs
        ``materialize(build(inputs))``, on CUDA through a graph of the call shape's setup
        (attnc.setup_graphs), so new inputs of a known shape cost one replay, not a launch per step; the
        graph's result is lent, and copied only if an entry still holds it when the graph replays again.
        """
        from .setup_graphs import SetupGraphs
        shape_key = key
        key = key + tuple((n, id(t), t._version) for n, t in inputs.items())
        cache = self.__dict__.setdefault("_setup_cache", {})
        entry = cache.get(key)
        if entry is not None and any(held() is not t for held, t in zip(entry[1], inputs.values())):
            entry = None
        if entry is None:
            for old in [k for k, (_, held) in cache.items() if any(ref() is None for ref in held)]:
                del cache[old]
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            graphs = self.__dict__.setdefault("_setup_graphs", SetupGraphs())
            entry = cache[key] = (graphs.run(shape_key, inputs, build, materialize),
                                  tuple(weakref.ref(t) for t in inputs.values()))
        return entry[0]

    def _setup_module(self, device):
        """The generated tile classifier where Triton runs (CUDA, or the interpreter); None: torch."""
        return self._module("setup") if device.type == "cuda" or _interpreting() else None

    def _classify(self, n_q, n_k, batch, heads, block_m, block_n, sizes, inputs, device, module):
        """Tile classes of a list-mode call: the generated classifier ``module`` on the device, or the
        torch classifier when it is None."""
        from .plan import PlannedTiles, TileClassifier
        if module is None:
            return PlannedTiles(TileClassifier(self.ir, n_q, n_k, batch, heads, block_m, block_n, sizes, inputs,
                                               device).classify())
        from .device_setup import plan_tiles
        from .plan import setup_shape
        shape = setup_shape(self.ir, batch, heads)
        return plan_tiles(module, self.ir, None, shape=shape, batch=batch, heads=heads, n_q=n_q, n_k=n_k,
                          block_m=block_m, block_n=block_n, sizes=sizes, inputs=inputs, device=device)[0]

    def _tile_lists(self, n_q, n_k, batch, heads, block_m, block_n, sizes, inputs, device, transposed=False):
        """Tile lists of a list-mode call (see :meth:`_input_cached`)."""
        key = ("lists", n_q, n_k, batch, heads, block_m, block_n, str(device), tuple(sorted(sizes.items())))
        return self._input_cached(key, inputs, lambda ins: self._classify(
            n_q, n_k, batch, heads, block_m, block_n, sizes, ins, device, self._setup_module(device)),
            _with_forward_lists).lists(transposed)

    def _layout(self, batch, heads_q, heads_kv, n_q, n_k, block_m, block_n, sizes, inputs, device):
        """The layout transform of a permuted-mode call (see :mod:`attnc.layout`), cached."""
        from .layout import build_layout
        from .plan import layout_transform
        key = ("layout", batch, heads_q, heads_kv, n_q, n_k, block_m, block_n, str(device),
               tuple(sorted(sizes.items())))
        return self._input_cached(key, inputs, lambda ins: build_layout(
            self.ir, layout_transform(self.ir.mask), batch, heads_q, heads_kv, n_q, n_k, block_m, block_n,
            sizes, ins, device, classifier=self._setup_module(device)), _with_forward_lists)

    def plan(self, n_q: int, n_k: int, batch: int = 1, heads: int = 1, block_m: int | None = None,
             block_n: int | None = None, **inputs):
        """The execution plan for these sizes (and runtime inputs): tiles computed, mode, transforms."""
        from .codegen import kernel_mode
        from .plan import list_plan, static_plan
        n_q, n_k, batch, heads = check_sizes(n_q=n_q, n_k=n_k, batch=batch, heads=heads)
        check_sizes(positive=True, **{k: v for k, v in (("block_m", block_m), ("block_n", block_n)) if v is not None})
        from .launch import check_grid

        def launchable(block_q: int, block_k: int):         # what the GPU kernels could launch
            for n, block, what in ((n_q, block_q, "queries"), (n_k, block_k, "keys")):
                check_grid(-(-n // block), block, n, what, torch.device("cuda"))
        launchable(block_m or 128, block_n or 128)          # no tiles at all (the largest) before choosing any
        bm, bn = (block_m, block_n) if block_m and block_n else self.block_sizes(n_q=n_q, n_k=n_k)
        bm, bn = block_m or bm, block_n or bn
        launchable(bm, bn)
        sizes = check_inputs(self.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k)
        mode = kernel_mode(self.ir)
        if mode == "ranges":
            return static_plan(self.ir, n_q, n_k, batch, heads, bm, bn)
        device = next((t.device for t in inputs.values()), torch.device("cpu"))
        # CUDA inputs plan with the device classifier the calls use; CPU ones with the torch classifier.
        classifier = self._module("setup") if device.type == "cuda" else None
        if mode == "permuted":
            from .launch import FwdConfig, padded, residue_ranges
            from .layout import build_layout
            from .plan import layout_transform, residue_plan
            transform = layout_transform(self.ir.mask)
            if residue_ranges(self, n_q, n_k, FwdConfig(bm, bn, 4, 1)):
                return residue_plan(self.ir, n_q, n_k, batch, heads, bm, bn)
            layout = build_layout(self.ir, transform, batch, heads, heads, n_q, n_k, bm, bn, sizes, inputs, device,
                                  classifier=classifier)
            plan = list_plan(self.ir, layout.status, n_q, n_k, batch, heads, bm, bn)
            plan.mode = "permuted"
            plan.transforms = list(transform.names)
            padding = ", each bucket started on a block boundary" if padded(layout, n_q, n_k) else ""
            plan.setup = (f"stable sorts of queries and keys per (batch, head){padding}, then tile classification "
                          f"of the sorted problem on {tuple(layout.status.shape)} blocks")
            return plan
        status = self._classify(n_q, n_k, batch, heads, bm, bn, sizes, inputs, device, classifier).status
        return list_plan(self.ir, status, n_q, n_k, batch, heads, bm, bn)

    def explain(self, n_q: int, n_k: int, batch: int = 1, heads: int = 1, **inputs) -> str:
        """A person's account of the plan (what `attnc compile --emit plan` prints)."""
        if self.ir.inputs and not inputs:
            inputs = self.example_inputs(n_q, n_k, batch, heads)
            note = f"\n  (runtime inputs drawn at random for this explanation: {', '.join(inputs)})"
        else:
            note = ""
        return str(self.plan(n_q, n_k, batch, heads, **inputs)) + note

    def example_inputs(self, n_q: int, n_k: int, batch: int = 1, heads: int = 1, seed: int = 0) -> dict:
        """Random runtime inputs of the declared shapes (for `attnc show` and explanations).

        Int inputs get small ids in sorted runs (documents), bools keep about half, floats are normal.
        Size names other than the built-ins are taken as max(n_q, n_k).
        """
        n_q, n_k, batch, heads = check_sizes(n_q=n_q, n_k=n_k, batch=batch, heads=heads)
        g = torch.Generator().manual_seed(seed)
        n = max(n_q, n_k)
        known = {"batch": batch, "heads": heads, "n_q": n_q, "n_k": n_k}
        out = {}
        for name, decl in self.ir.inputs.items():
            shape = [d if isinstance(d, int) else known.get(d, n) for d in decl.dims]
            if decl.dtype == "int":
                groups = max(2, min(8, shape[-1] // 16 or 2))
                t = torch.randint(0, groups, shape, generator=g)
                out[name] = torch.sort(t, dim=-1).values if len(shape) >= 1 else t
            elif decl.dtype == "bool":
                out[name] = torch.rand(shape, generator=g) < 0.5
            else:
                out[name] = torch.randn(shape, generator=g) * 0.1
        return out

    def flex_mask_mod(self, n_q: int, n_k: int, batch: int = 1, heads: int = 1, **inputs):
        """This pattern's mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (for comparisons)."""
        from .evaluate import evaluate
        n_q, n_k, batch, heads = check_sizes(n_q=n_q, n_k=n_k, batch=batch, heads=heads)
        sizes = check_inputs(self.ir, inputs, batch=batch, heads=heads, n_q=n_q, n_k=n_k)
        mask = self.ir.mask

        def mask_mod(b, h, q_idx, kv_idx):
            env = dict(sizes, b=b, h=h, q=q_idx, k=kv_idx, **inputs)
            return torch.as_tensor(evaluate([mask], env)[0], device=q_idx.device)

        return mask_mod

    # ---- autotuning --------------------------------------------------------------------------------
    def autotune(self, seq: int, batch: int | None = None, heads: int = 16, dim: int = 128,
                 dtype=torch.bfloat16, **inputs):
        """Search forward and backward kernel configurations on the current CUDA GPU and store the winners.

        Times the candidates of ``attnc.tuning.search_space`` on random q, k, v of shape
        (batch, heads, seq, dim) (batch defaults to 32768 // seq) with the given runtime inputs (default:
        random ones), and writes the fastest checked configuration to ``$ATTNC_CACHE_DIR/tuning.json``;
        later calls with this GPU, dtype, head dim and sequence-length bucket use it. Returns an
        ``attnc.tuning.TuneReport``; ``print(report)`` summarizes it. Raises InputError without CUDA.
        """
        from .tuning import autotune
        return autotune(self, seq, batch=batch, heads=heads, dim=dim, dtype=dtype, inputs=inputs or None)


def _with_forward_lists(setup):
    """A setup result (PlannedTiles or Layout) with what every forward reads made now: its forward tile
    lists, and a moved layout's int32 positions (so a graphed setup holds them; attnc.setup_graphs)."""
    setup.lists(False)
    if hasattr(setup, "identity") and not setup.identity:
        setup.qpos, setup.kpos            # noqa: B018 (cached properties, made on first use)
    return setup
