"""Sweep forward / backward kernel configurations of several benchmark patterns on the GPU, beside
FlexAttention in the same process (a manual autotune for NOTES.md experiments).

    python3 benchmarks/sweep_configs.py --patterns causal,sliding_window_1024 --seqs 8192,32768 \
        --fwd "128,64,8,3;128,64,8,3,tma" --bwd "64,64,4,2;128,64,8,2/64,128,8,2" --out $OUT

A configuration is "block_m,block_n,num_warps,num_stages" with an optional ",tma" (forward K/V tiles
through tensor descriptors), or "default" (attnc's own choice); a backward one may name the dK/dV kernel's
own tiles after a "/". ``--env`` runs everything once per environment variant, e.g.
``--env "ATTNC_HEAD_GROUP=0;ATTNC_HEAD_GROUP=4" --repeat 2`` alternates the two settings twice in one
process (A/B without a second process's drift).
Every configuration's output (forward) or gradients (forward+backward) are checked against
FlexAttention's before it is timed; a failing or crashing configuration is reported, not timed.
Rows go to ``OUT/sweep.jsonl``; a table is printed last.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_all  # noqa: E402
import variant_launches  # noqa: E402
from attnc.bench import (CLOCK_KEYS, HEAT_MS, _flex, effective_tflops, env_info, mask_density,  # noqa: E402
                         relative_error, time_stats)

FWD = ["128,64,8,3", "128,64,8,3,tma", "128,128,8,3", "128,128,8,3,tma", "128,64,4,3", "64,64,4,3"]
BWD = ["64,64,4,2", "64,64,8,2", "128,64,8,2/64,128,8,2", "64,64,4,3", "128,64,8,2/64,64,4,2"]


def _run(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - a configuration may not fit; report and go on
        return None, f"{type(exc).__name__}: {str(exc)[:160]}"


def _set_config(name: str, cfg: str) -> None:
    if cfg == "default":
        os.environ.pop(name, None)
    else:
        os.environ[name] = cfg


def _env_variants(text: str) -> list[dict]:
    """"A=1,B=2;A=3" -> [{"A": "1", "B": "2"}, {"A": "3"}]; "-" is the unchanged environment."""
    variants = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        variants.append({} if part == "-" else dict(kv.split("=", 1) for kv in part.split(",")))
    return variants or [{}]


def sweep_one(spec, n: int, args, fwd_cfgs: list, bwd_cfgs: list, emit) -> None:
    call = bench_all.bench_call(spec, n, args.tokens, args.heads, args.dim)
    kern, inputs, mask_mod, bm = call.kern, call.inputs, call.mask_mod, call.block_mask
    b, h, d = call.batch, call.heads, call.dim
    q, k, v, dout = call.q, call.k, call.v, call.dout
    density = mask_density(mask_mod, batch=b, heads=h, n_q=n, n_k=n, device="cuda")
    qkv = [q, k, v]

    def grads():
        out = [x.grad.detach().clone() for x in qkv]
        for x in qkv:
            x.grad = None
        return out

    flex = _flex()
    ref_out = flex(q, k, v, block_mask=bm)
    ref_out.backward(dout)
    ref_out, ref_grads = ref_out.detach(), grads()
    base = dict(pattern=spec.name, N=n, B=b, H=h, D=d, density=density)

    def tflops(ms, bwd):
        return effective_tflops(b, h, n, n, d, density, ms, fwdbwd=bwd) if density else None

    def timed(fn, grads=None) -> dict:
        """ms (median) and, with ``--clocks``, the SM clock and power while timing."""
        st = time_stats(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads, clocks=args.clocks)
        return {"ms": st["median"], **{k: st[k] for k in CLOCK_KEYS if k in st}}

    st = timed(lambda: flex(q, k, v, block_mask=bm))
    flex_fwd = st["ms"]
    emit(dict(base, impl="flex", kind="fwd", config="-", **st, tflops=tflops(flex_fwd, False)))
    st = timed(lambda: flex(q, k, v, block_mask=bm).backward(dout), qkv)
    flex_fb = st["ms"]
    emit(dict(base, impl="flex", kind="fwdbwd", config="-", **st, tflops=tflops(flex_fb, True)))

    def configs(label: str) -> None:
        row_base = dict(base, env=label)
        for cfg in fwd_cfgs:
            _set_config("ATTNC_FWD_CONFIG", cfg)
            out, err = _run(lambda: kern(q, k, v, **inputs).detach())
            row = dict(row_base, impl="attnc", kind="fwd", config=cfg)
            if err is None:
                row["rel_err"] = relative_error(out, ref_out)
                if not row["rel_err"] <= 1e-2:
                    err = f"wrong output: relative error {row['rel_err']:.2e}"
            if err is None:
                st = timed(lambda: kern(q, k, v, **inputs))
                row.update(st, tflops=tflops(st["ms"], False), vs_flex=flex_fwd / st["ms"])
                if args.host_report and cfg == "default":
                    variant_launches.host_report(lambda: kern(q, k, v, **inputs), f"{spec.name} fwd")
            else:
                row["error"] = err
            emit(row)
        _set_config("ATTNC_FWD_CONFIG", args.bwd_fwd_config)
        for cfg in bwd_cfgs:
            _set_config("ATTNC_BWD_CONFIG", cfg)
            row = dict(row_base, impl="attnc", kind="fwdbwd", config=f"{args.bwd_fwd_config} | {cfg}")
            for x in qkv:
                x.grad = None                   # timing leaves the last run's gradients behind
            _, err = _run(lambda: kern(q, k, v, **inputs).backward(dout))
            if err is None:
                got = grads()
                row["rel_err"] = max(relative_error(a, r) for a, r in zip(got, ref_grads))
                if not row["rel_err"] <= 3e-2:
                    err = f"wrong gradients: relative error {row['rel_err']:.2e}"
            if err is None:
                st = timed(lambda: kern(q, k, v, **inputs).backward(dout), qkv)
                row.update(st, tflops=tflops(st["ms"], True), vs_flex=flex_fb / st["ms"])
            else:
                row["error"] = err
            emit(row)

    for _ in range(args.repeat):
        for env in _env_variants(args.env):
            # The variant's settings, and the configurations set for it, are undone when it ends.
            with mock.patch.dict(os.environ, env):
                configs(",".join(f"{name}={value}" for name, value in env.items()))
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patterns", default="causal,sliding_window_1024,prefix_lm_2048,document_causal")
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--fwd", default=";".join(FWD), help="forward configurations, ';' separated")
    ap.add_argument("--bwd", default=";".join(BWD), help="backward configurations, ';' separated")
    ap.add_argument("--bwd-fwd-config", default="128,64,8,3", help="forward configuration of the f+b runs")
    ap.add_argument("--warmup", type=float, default=HEAT_MS,
                    help="do_bench warm-up, ms (the clock settles at the power limit: attnc.bench.HEAT_MS)")
    ap.add_argument("--rep", type=float, default=100)
    ap.add_argument("--env", default="-", help="environment variants, ';' separated, each 'NAME=VALUE[,...]' "
                    "or '-' (unchanged)")
    ap.add_argument("--clocks", action="store_true", help="record the SM clock and power while timing (NVML)")
    ap.add_argument("--host-report", action="store_true",
                    help="after timing each default forward, variant_launches.host_report of it")
    ap.add_argument("--repeat", type=int, default=1, help="run the environment variants this many times")
    ap.add_argument("--out", default=os.environ.get("OUT") or "./sweep_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_env.json").write_text(json.dumps(env_info(sys.argv), default=str, indent=1))
    rows = []

    def emit(row):
        rows.append(row)
        with open(out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        ms = f"{row['ms']:.3f} ms" if row.get("ms") else row.get("error", "")
        mhz = f" {row['mhz'][0]} MHz ({row['mhz'][1]}-{row['mhz'][2]})" if row.get("mhz") else ""
        print(f"{row['pattern']:20s} {row['N']:6d} {row['kind']:7s} {row['impl']:5s} {row['config']:34s} "
              f"{row.get('env', '')[:30]:30s} {ms}{mhz}", flush=True)

    fwd_cfgs = [c for c in args.fwd.split(";") if c]
    bwd_cfgs = [c for c in args.bwd.split(";") if c]
    t0 = time.time()
    for n in (int(x) for x in args.seqs.split(",")):
        for name in args.patterns.split(","):
            sweep_one(bench_all.SPEC_BY_NAME[name], n, args, fwd_cfgs, bwd_cfgs, emit)
    print(f"\nsweep took {time.time() - t0:.0f} s; x = FlexAttention time / attnc time (same run)")
    print(f"{'pattern':20s} {'N':>6s} {'kind':7s} {'config':34s} {'env':30s} {'ms':>8s} {'TFLOP/s':>8s} "
          f"{'x flex':>7s} {'MHz':>5s}")
    for r in rows:
        if r["impl"] == "attnc":
            tf = f"{r['tflops']:8.1f}" if r.get("tflops") else " " * 8
            x = f"{r['vs_flex']:7.2f}" if r.get("vs_flex") else "  error"
            ms = f"{r['ms']:8.3f}" if r.get("ms") else " " * 8
            mhz = f"{r['mhz'][0]:5d}" if r.get("mhz") else ""
            print(f"{r['pattern']:20s} {r['N']:6d} {r['kind']:7s} {r['config']:34s} {r['env'][:30]:30s} {ms} {tf} {x}"
                  f" {mhz}")


if __name__ == "__main__":
    main()
