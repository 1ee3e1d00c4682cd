import os, sys, torch
sys.path.insert(0, os.getcwd())
import attnc
import torch.nn.functional as F
kern = attnc.compile("examples/causal.attn")
def rel(a, b): return float((a.double()-b.double()).norm()/b.double().norm())
for N, B in [(4097, 1), (8192, 4), (8192, 1)]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, 16, N, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, 16, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    ref = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v): x.grad = None
    for cfg in ["", "64,64,4,2", "64,64,4,3", "32,32,4,1", "128,64,8,2/64,128,8,2", "64,64,4,2/64,64,4,2"]:
        if cfg: os.environ["ATTNC_BWD_CONFIG"] = cfg
        else: os.environ.pop("ATTNC_BWD_CONFIG", None)
        kern(q, k, v).backward(do)
        got = [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v): x.grad = None
        print(N, B, repr(cfg), " ".join(f"{n}={rel(a, r):.2e}" for n, a, r in zip("qkv", got, ref)), flush=True)
