"""Reference semantics in plain torch: the dense mask and attention, memory-bounded by row chunks."""

from __future__ import annotations

import math

import torch

from . import ir
from .analyze import PatternIR
from .evaluate import evaluate

# Bound on the elements of one (B, H, rows, Nk) score chunk (~256 MB in float64).
CHUNK_ELEMENTS = 1 << 25


def index_env(batch: int, heads: int, q_pos: torch.Tensor, n_k: int, sizes: dict, device) -> dict:
    """Broadcastable index tensors over (batch, heads, rows, keys) plus the sizes."""
    env = dict(sizes)
    env["b"] = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    env["h"] = torch.arange(heads, device=device).view(1, heads, 1, 1)
    env["q"] = q_pos.view(1, 1, -1, 1)
    env["k"] = torch.arange(n_k, device=device).view(1, 1, 1, n_k)
    return env


def dense_mask(pir: PatternIR, n_q: int, n_k: int, batch: int, heads: int, sizes: dict, inputs: dict,
               device=None) -> torch.Tensor:
    """The pattern's mask as a dense bool tensor (batch, heads, n_q, n_k), evaluated in chunks of query rows
    (the evaluator's integer temporaries take ~30 bytes per pair; the result takes one)."""
    out = torch.empty(batch, heads, n_q, n_k, dtype=torch.bool, device=device)
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    for start in range(0, n_q, rows):
        end = min(n_q, start + rows)
        env = index_env(batch, heads, torch.arange(start, end, device=device), n_k, sizes, device)
        env.update(inputs)
        m = torch.as_tensor(evaluate([pir.mask], env)[0], device=device)
        out[:, :, start:end] = m.expand(batch, heads, end - start, n_k)
    return out


def reference_attention(pir: PatternIR, q, k, v, *, scale: float, sizes: dict, inputs: dict,
                        return_lse: bool = False):
    """Attention with the pattern's mask and score, in float32 (float64 for float64 inputs).

    Rows whose keys are all masked give output 0 and lse -inf, with zero (never NaN) gradients.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = Hq // Hkv
    kk = k.to(cd).repeat_interleave(group, dim=1) if group > 1 else k.to(cd)
    vv = v.to(cd).repeat_interleave(group, dim=1) if group > 1 else v.to(cd)
    qq = q.to(cd)
    rows = max(1, CHUNK_ELEMENTS // max(1, B * Hq * Nk))
    outs, lses = [], []
    float_inputs = {n: (t.to(cd) if t.is_floating_point() else t) for n, t in inputs.items()}
    for start in range(0, Nq, rows):
        end = min(Nq, start + rows)
        s = torch.matmul(qq[:, :, start:end], kk.transpose(-1, -2)) * scale
        env = index_env(B, Hq, torch.arange(start, end, device=q.device), Nk, sizes, q.device)
        env.update(float_inputs)
        env["score"] = s
        env["__float__"] = cd
        roots = [pir.mask] + ([pir.score] if pir.score is not None else [])
        vals = evaluate(roots, env)
        mask = torch.as_tensor(vals[0], device=q.device).expand_as(s)
        if pir.score is not None:
            s = torch.as_tensor(vals[1], device=q.device, dtype=cd).expand_as(s)
        s = torch.where(mask, s, torch.tensor(-math.inf, dtype=cd, device=q.device))
        m = s.amax(dim=-1, keepdim=True) if Nk else s.new_full(s.shape[:-1] + (1,), -math.inf)  # no keys at all
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        p = torch.exp(s - m_safe)
        p = torch.where(mask, p, torch.zeros_like(p))
        l = p.sum(dim=-1, keepdim=True)
        has = l > 0
        l_safe = torch.where(has, l, torch.ones_like(l))
        outs.append(torch.matmul(p, vv) / l_safe)
        lse = torch.where(has, m_safe + torch.log(l_safe), torch.full_like(l, -math.inf))
        lses.append(lse.squeeze(-1))
    if not outs:                # no queries: empty results, still in the autograd graph of q, k, v
        outs = [torch.matmul(qq[:, :, :0, :0], vv[:, :, :0, :].expand(B, Hq, 0, Dv))]
        lses = [qq[:, :, :, 0] + kk.sum() * 0]
    out = torch.cat(outs, dim=2)
    lse = torch.cat(lses, dim=2)
    out = out.to(q.dtype)
    if return_lse:
        return out, (lse if cd == torch.float64 else lse.float())
    return out
