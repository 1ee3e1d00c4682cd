"""Each compiled pattern as a torch custom op with autograd, so ``torch.compile`` runs through it.

One set of operators is registered (with ``torch.library.custom_op``) per distinct generated kernel,
named after the forward kernel's source key ``attnc.launch.source_key(kern.ir, "fwd")``:

- ``attnc::fwd_<key>(q, k, v, inputs, scale) -> (out, lse)``: the Triton forward kernel;
- ``attnc::bwd_<key>(q, k, v, out, lse, dout, dlse, inputs, scale) -> (dq, dk, dv)``: the two
  Triton backward kernels;
- ``attnc::dinputs_<key>(q, k, v, out, lse, dout, dlse, inputs, scale, which) -> [grads]``: the
  gradients of the float runtime inputs numbered in ``which`` (see below).

``inputs`` is the list of runtime-input tensors in the pattern's declaration order
(``kern.ir.inputs``). The operators take no dictionaries and no sizes: each real implementation
recomputes the sizes from the shapes with ``validate.check_inputs``. The fake (meta)
implementations return empty tensors of the right shapes and dtypes and never read data, so
FakeTensor tracing, AOTAutograd and dynamic shapes see through the kernels. The operators are
registered once per process, on first use; kernels with one source key share them.

Eager calls. Outside ``torch.compile`` and other tracers, ``kern(q, k, v)`` runs the same launchers under a
plain ``torch.autograd.Function`` (``_EagerAttention``) instead of dispatching the operators: the
dispatcher, the operators' autograd wrapper and the layout checks cost the host ~0.5-0.75 ms per
forward+backward on an H200 (benchmarks/RESULTS.md run 74), as much as a sparse pattern's kernels at 8k.
The eager path is taken only for plain tensors with no torch dispatch mode, no functorch transform and no
Dynamo tracing active (``_eager``); anything else (FakeTensor, ``make_fx``, ``torch.func``, subclasses)
goes through the operators. Both paths compute with the same functions and give the same numbers.

Gradients. ``q``, ``k`` and ``v`` get theirs from the Triton backward kernels (deterministic, no
atomics). Float runtime inputs read by the ``score`` expression get theirs in one of two ways:

- by default, from the dQ kernel (``attnc.codegen.grad_inputs``): it multiplies each tile's
  d(loss)/d(score) by the symbolic derivative of the score by each read (``attnc.ir.derivative``), sums
  the product over the tile's axes the read's index does not run over (the whole tile for ALiBi slopes
  ``s[h]``, the keys for a per-row input, nothing for a relative bias ``bias[h, q - k + c]``) and adds the
  sums to a float32 gradient with atomic adds. Cheap (RESULTS runs 93-94, at 8k: ALiBi +3% over a
  backward without it, a relative bias +36%, against 20-30x for the recompute), but the order of the
  adds, and so the last bits, vary from run to run. Without q, k, v gradients only the dQ kernel runs.
- while ``torch.use_deterministic_algorithms(True)`` is on: a plain-torch recompute,
  ``score_input_grads``. The score is recomputed in row chunks with the reference evaluator,
  ``P = exp(score - lse)``, ``dS = P * (dO V^T - delta)`` with ``delta = rowsum(dO * O) - dlse``, and ``dS``
  is carried back through the score expression to the inputs by reverse-mode autograd
  (``torch.func.vjp``), summed over the chunks. That path is deterministic and exact for any score
  expression, but it costs O(Nq x Nk) compute in float32 (float64 for float64 inputs) and O(chunk x Nk)
  memory, a chunk being bounded like ``kern.reference``'s.

Both handle a score that reads the same tensor several times (FlexAttention refuses that): each read is
differentiated on its own and the gradients add up. Inputs read only by the mask get zero gradients; int
and bool inputs get none.
"""

import math
import threading
from dataclasses import dataclass

import torch

from .codegen import grad_inputs
from .evaluate import evaluate
from .launch import launch_backward, launch_forward, source_key
from .reference import CHUNK_ELEMENTS, index_env
from .validate import check_inputs, check_qkv

NAMESPACE = "attnc"

_FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor[] inputs, float scale) -> (Tensor, Tensor)"
_BWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor? dlse, "
               "Tensor[] inputs, float scale) -> (Tensor, Tensor, Tensor)")
_DINPUTS_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor? dlse, "
                   "Tensor[] inputs, float scale, int[] which) -> Tensor[]")


@dataclass(frozen=True)
class KernelOps:
    """The custom operators of one generated kernel."""
    key: str
    forward: torch._ops.OpOverload
    backward: torch._ops.OpOverload
    input_grads: torch._ops.OpOverload


_registry: dict[str, KernelOps] = {}
_lock = threading.Lock()


def _call_sizes(kern, q, k, v, named: dict) -> dict:
    """The sizes of one call, recomputed from the shapes (the operators carry no dictionaries)."""
    shapes = check_qkv(q, k, v)
    return check_inputs(kern.ir, named, batch=shapes.batch, heads=shapes.heads_q, n_q=shapes.n_q,
                        n_k=shapes.n_k, device=q.device)


def _laid_out_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``ref``) with the strides of ``torch.empty_like(ref)``, which is what the fake
    implementations promise (compiled graphs may rely on it); copied only when they differ."""
    like = torch.empty_like(ref, device="meta", dtype=t.dtype)
    if t.stride() == like.stride() and t.storage_offset() == 0:
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def ops_for(kern) -> KernelOps:
    """The operators of ``kern``'s kernel, registered on first use (once per process and source key)."""
    cached = kern.__dict__.get("_torch_ops")
    if cached is not None:
        return cached
    key = source_key(kern.ir, "fwd")
    with _lock:
        if key not in _registry:
            _registry[key] = _register(kern, key)
        ops = _registry[key]
    kern.__dict__["_torch_ops"] = ops
    return ops


def attention_op(kern, q, k, v, values: list, scale: float, sizes: dict | None = None):
    """(out, lse) of ``kern``; differentiable in q, k, v and float inputs. ``sizes``: the call's sizes if the
    caller has checked the inputs already.

    In eager mode (``_eager``) through ``_EagerAttention``; otherwise through the custom operator, which
    was registered when the kernel was built (``Kernel._op_name``), so tracing this under torch.compile
    reads a string attribute and never hashes or registers anything."""
    if _eager(q, k, v, values):
        if sizes is None:
            sizes = _call_sizes(kern, q, k, v, dict(zip(kern.ir.inputs, values)))
        return _EagerAttention.apply(kern, scale, sizes, q, k, v, *values)
    forward = getattr(getattr(torch.ops, NAMESPACE), kern._op_name)
    return forward(q, k, v, list(values), scale)


def _eager(q, k, v, values) -> bool:
    """Whether a call may skip the dispatcher: not traced by Dynamo, plain tensors only (no FakeTensor,
    functional or other subclass), and no torch dispatch mode or functorch transform active. Where this
    torch lacks one of the checks, the operators are used."""
    if torch.compiler.is_compiling() or q.device.type == "meta":     # meta tensors: the operator's fake
        return False
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return False
    if any(type(t) is not torch.Tensor for t in values):
        return False
    try:
        return (torch._C._len_torch_dispatch_stack() == 0
                and torch._C._functorch.peek_interpreter_stack() is None)
    except AttributeError:
        return False


def _qkv_grads(kern, q, k, v, out, lse, dout, dlse, scale: float, named: dict, sizes: dict | None = None):
    """dq, dk, dv from the Triton backward kernels."""
    if sizes is None:
        sizes = _call_sizes(kern, q, k, v, named)
    return launch_backward(kern, q, k, v, out, lse, dout, dlse, scale=scale, sizes=sizes, inputs=named)


def kernel_input_grads() -> bool:
    """Whether float score inputs get their gradients from the dQ kernel (float atomic adds, whose order
    varies) rather than from the deterministic torch recompute (:func:`score_input_grads`): the kernel
    unless ``torch.use_deterministic_algorithms(True)`` is in effect."""
    return not torch.are_deterministic_algorithms_enabled()


def _input_grads(kern, q, k, v, out, lse, dout, dlse, scale: float, named: dict, which, sizes: dict | None = None,
                 qkv: bool = False):
    """Gradients of the runtime inputs numbered in ``which`` (declaration order), and with ``qkv`` also dq, dk,
    dv from the same backward launch: ``(grads, dqkv)``, dqkv None without ``qkv``. From the dQ kernel
    (:func:`kernel_input_grads`; without ``qkv`` the dK/dV kernel is not launched) or from
    :func:`score_input_grads`."""
    names = tuple(kern.ir.inputs)
    wanted = [names[i] for i in which]
    if sizes is None:
        sizes = _call_sizes(kern, q, k, v, named)
    # The inputs the score reads (codegen.grad_inputs) from the dQ kernel (float32 sums), unless torch's
    # deterministic mode asks for the recompute; the others (read by the mask alone) get zeros.
    read = set(grad_inputs(kern.ir))
    in_kernel = read if kernel_input_grads() else set()
    sums = {n: torch.zeros(named[n].shape, dtype=torch.float32, device=q.device) for n in wanted if n in in_kernel}
    rest = [n for n in wanted if n in read and n not in in_kernel]
    grads = score_input_grads(kern, q, k, v, out, lse, dout, dlse, scale=scale, sizes=sizes, inputs=named,
                              wanted=rest) if rest else {}
    grads.update({n: torch.zeros_like(named[n]) for n in wanted if n not in read})
    dqkv = None
    if sums:
        dqkv = launch_backward(kern, q, k, v, out, lse, dout, dlse, scale=scale, sizes=sizes, inputs=named,
                               input_grads=sums, dq_only=not qkv)
    elif qkv:
        dqkv = _qkv_grads(kern, q, k, v, out, lse, dout, dlse, scale, named, sizes)
    grads.update({n: t.to(named[n].dtype) for n, t in sums.items()})
    return [grads[n] for n in wanted], (dqkv if qkv else None)


def _wanted_grads(need_qkv, need_inputs, values, qkv_grads, input_grads):
    """What a backward formula returns for q, k, v (a tuple) and the runtime inputs (a list), given which of
    them autograd asks for: ``qkv_grads()`` gives dq, dk, dv; ``input_grads(which, qkv)`` the gradients of the
    float inputs numbered in ``which`` (int and bool inputs get none) and, when ``qkv`` is true, dq, dk, dv of
    the same launch (or None, then ``qkv_grads`` runs). Shared by the operators' autograd and
    ``_EagerAttention``, which differ only in how they compute them."""
    dvalues = [None] * len(values)
    which = [i for i, (need, t) in enumerate(zip(need_inputs, values)) if need and t.is_floating_point()]
    dqkv = None
    if which:
        grads, dqkv = input_grads(which, any(need_qkv))
        for i, g in zip(which, grads):
            dvalues[i] = g
    if dqkv is None:
        dqkv = qkv_grads() if any(need_qkv) else (None, None, None)
    return tuple(g if need else None for g, need in zip(dqkv, need_qkv)), dvalues


class _EagerAttention(torch.autograd.Function):
    """``kern(q, k, v)`` in eager mode: the operators' forward and backward without the dispatcher.

    Grads of unused outputs are not materialized: a call whose lse is not used runs the backward without
    reading a dlse (the operators' autograd gets a tensor of zeros there)."""

    @staticmethod
    def forward(ctx, kern, scale, sizes, q, k, v, *values):
        named = dict(zip(kern.ir.inputs, values))
        out, lse, _ = launch_forward(kern, q, k, v, scale=scale, sizes=sizes, inputs=named)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, *values)
        ctx.call = (kern, scale, sizes)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        kern, scale, sizes = ctx.call
        q, k, v, out, lse, *values = ctx.saved_tensors
        named = dict(zip(kern.ir.inputs, values))
        if dout is None:
            dout = torch.zeros_like(out)
        needs = ctx.needs_input_grad[3:]
        dqkv, dvalues = _wanted_grads(
            needs[:3], needs[3:], values,
            lambda: _qkv_grads(kern, q, k, v, out, lse, dout, dlse, scale, named, sizes),
            lambda which, qkv: _input_grads(kern, q, k, v, out, lse, dout, dlse, scale, named, which, sizes, qkv))
        return (None, None, None, *dqkv, *dvalues)


def _register(kern, key: str) -> KernelOps:
    """Define the three operators of one kernel, their fake implementations and their autograd."""
    names = tuple(kern.ir.inputs)

    def forward(q, k, v, inputs, scale):
        named = dict(zip(names, inputs))
        out, lse, _ = launch_forward(kern, q, k, v, scale=scale, sizes=_call_sizes(kern, q, k, v, named),
                                     inputs=named)
        return out.contiguous(), lse.contiguous()

    def forward_fake(q, k, v, inputs, scale):
        B, Hq, Nq, _ = q.shape
        out = q.new_empty((B, Hq, Nq, v.shape[-1]))
        return out, q.new_empty((B, Hq, Nq), dtype=torch.float32)

    def backward(q, k, v, out, lse, dout, dlse, inputs, scale):
        grads = _qkv_grads(kern, q, k, v, out, lse, dout, dlse, scale, dict(zip(names, inputs)))
        return tuple(_laid_out_like(g, x) for g, x in zip(grads, (q, k, v)))

    def backward_fake(q, k, v, out, lse, dout, dlse, inputs, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def input_grads(q, k, v, out, lse, dout, dlse, inputs, scale, which):
        grads, _ = _input_grads(kern, q, k, v, out, lse, dout, dlse, scale, dict(zip(names, inputs)), which)
        # Fresh tensors laid out like the inputs, as the fake implementation promises.
        return [_laid_out_like(g, inputs[i]) for g, i in zip(grads, which)]

    def input_grads_fake(q, k, v, out, lse, dout, dlse, inputs, scale, which):
        return [torch.empty_like(inputs[i]) for i in which]

    def define(prefix, fn, fake, schema):
        op = torch.library.custom_op(f"{NAMESPACE}::{prefix}_{key}", fn, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op, getattr(getattr(torch.ops, NAMESPACE), f"{prefix}_{key}").default

    fwd, fwd_overload = define("fwd", forward, forward_fake, _FWD_SCHEMA)
    _, bwd = define("bwd", backward, backward_fake, _BWD_SCHEMA)
    _, dinputs = define("dinputs", input_grads, input_grads_fake, _DINPUTS_SCHEMA)

    def setup_context(ctx, inputs, output):
        q, k, v, values, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *values)
        ctx.scale = scale

    def backward_formula(ctx, dout, dlse):
        q, k, v, out, lse, *values = ctx.saved_tensors
        need_q, need_k, need_v, need_inputs, _ = ctx.needs_input_grad
        dqkv, dvalues = _wanted_grads(
            (need_q, need_k, need_v), need_inputs, values,
            lambda: bwd(q, k, v, out, lse, dout, dlse, values, ctx.scale),
            lambda which, qkv: (dinputs(q, k, v, out, lse, dout, dlse, values, ctx.scale, which), None))
        return (*dqkv, dvalues, None)

    fwd.register_autograd(backward_formula, setup_context=setup_context)
    return KernelOps(key, fwd_overload, bwd, dinputs)


def score_input_grads(kern, q, k, v, out, lse, dout, dlse, *, scale: float, sizes: dict, inputs: dict,
                      wanted: list) -> dict:
    """Gradients of the float runtime inputs named in ``wanted``, by a plain-torch recompute.

    For each chunk of query rows: the score is recomputed with the reference evaluator,
    ``P = exp(score - lse)`` (0 where masked and on rows without keys), ``dS = P * (dO V^T - delta)``
    with ``delta = rowsum(dO * O) - dlse``, and ``dS`` is pulled back through the score expression
    to the inputs with ``torch.func.vjp``. (``torch.func`` rather than ``torch.autograd.grad``: this
    runs inside a custom operator, below the dispatcher's autograd layer.) The sums are in float32
    (float64 for float64 q); the memory is that of one chunk.
    """
    pir = kern.ir
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device
    leaves = [inputs[n].detach().to(cd) for n in wanted]
    totals = [torch.zeros_like(t) for t in leaves]
    if pir.score is None or Nq == 0 or Nk == 0 or B * Hq == 0:
        return dict(zip(wanted, totals))
    group = Hq // Hkv
    kk = k.detach().to(cd)
    vv = v.detach().to(cd)
    if group > 1:
        kk, vv = kk.repeat_interleave(group, dim=1), vv.repeat_interleave(group, dim=1)
    qq, do = q.detach().to(cd), dout.detach().to(cd)
    delta = (do * out.detach().to(cd)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.detach().to(cd)
    # Rows without a visible key have lse = -inf; +inf there makes every recomputed P exactly 0.
    lse_c = torch.where(torch.isneginf(lse), math.inf, lse.detach().to(cd))
    fixed = {n: (t.detach().to(cd) if t.is_floating_point() else t) for n, t in inputs.items()
             if n not in wanted}
    rows = max(1, CHUNK_ELEMENTS // max(1, B * Hq * Nk))
    for start in range(0, Nq, rows):
        end = min(Nq, start + rows)
        s = torch.matmul(qq[:, :, start:end], kk.transpose(-1, -2)) * scale
        env = index_env(B, Hq, torch.arange(start, end, device=device), Nk, sizes, device)
        env.update(fixed)
        env["score"] = s
        env["__float__"] = cd

        def score_of(*values):
            mask, score = evaluate([pir.mask, pir.score], dict(env, **dict(zip(wanted, values))))
            score = torch.as_tensor(score, dtype=cd, device=device).expand_as(s)
            return score, torch.as_tensor(mask, device=device).expand_as(s)

        score, pullback, mask = torch.func.vjp(score_of, *leaves, has_aux=True)
        p = torch.where(mask, torch.exp(score - lse_c[:, :, start:end, None]), 0.0)
        dp = torch.matmul(do[:, :, start:end], vv.transpose(-1, -2))
        ds = torch.where(mask, p * (dp - delta[:, :, start:end, None]), 0.0)
        for total, g in zip(totals, pullback(ds)):
            total += g
    return dict(zip(wanted, totals))
