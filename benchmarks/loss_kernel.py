"""What the fused PRDP loss kernel buys (docs/design.md §10): time, peak memory, bandwidth, precision.

Three ways to compute the PRDP loss and its gradient w.r.t. the raw CFG UNet outputs (eps_u, eps_c)
over whole trajectories (G groups x B images x T steps, latents of D elements):

  naive     the code a user would write from the paper: per-step Gaussian log-probs by plain
            PyTorch ops (prdp_ds.logratio.gaussian_log_prob, for theta and ref; the old log-probs
            stored at sampling time, also by gaussian_log_prob), then the paper's loss
            prdp_ds.loss.prdp_loss_reference, which forms log-ratios by subtracting log-probs.
  compile   torch.compile of exactly the same function.
  fused     kernels.fused_prdp_loss_triton (cancellation-free log-ratios + RDP loss, Triton) with its
            default backward="residual": the forward saves u = x_prev - mu_theta in fp32, the backward
            reads u and writes the two gradients.
  fused_rc  the same op with backward="recompute": nothing (G,B,T,D)-sized saved, the backward re-reads
            eps_u, eps_c, x_t, x_prev (the design measured on the H200 on 2026-11-30).

Columns: forward ms and forward+backward ms (median; triton.testing.do_bench on GPU), peak memory
above the inputs (MB), achieved GB/s against the bytes floor (inputs read once, plus for fwd+bwd the
two gradients written once) and that floor's time at the copy bandwidth measured here with a big
tensor copy, as % ("% floor": 100 means as fast as reading the inputs once at copy speed);
errors against an fp64 reference (exact two-pass autograd in fp64, chunked to bound memory):
loss (relative), gradients (max abs error / max abs gradient), log-ratios (max abs error, nats).

Bytes accounting (per latent element; s = bytes of eps_u / eps_c, c = bytes of eps_ref, x_t, x_prev,
fp32 here): floor fwd 2s + 3c, fwd+bwd 4s + 3c; fused fwd 2s + 3c + 4 (the fp32 residual written),
fwd+bwd 4s + 3c + 8; fused_rc fwd 2s + 3c, fwd+bwd 6s + 5c (B/el column: a design's fwd+bwd bytes;
its ceiling at copy speed is floor / design: fused 78% (fp32) / 71% (bf16), fused_rc 64% / 62%).

The max-branch fix at the paper's beta (docs/design.md §5): the fused rows' grad err is that fix's
gradient error through the fused op (1.3e-2 at 64x8 fp32 on the H200 before the fix). They also give it
isolated from the log-ratios' error: dL/dr err = max |dL/dr - dL/dr_64| / max |dL/dr_64| of the RDP
kernel on the exact log-ratios rounded to fp32, and tied = the share of valid pairs whose e and e'
(from fp32 R, C) are equal in fp32, where comparing the rounded squares would pick the branch by rounding.

On a machine without a GPU it runs tiny sizes under TRITON_INTERPRET=1: timings there mean
nothing (the interpreter executes Triton programs in numpy); only the error columns do.

  python benchmarks/loss_kernel.py [--json PATH] [--dtypes fp32,bf16] [--no-compile]
                                   [--gxb 1x8,8x8,16x16,64x8] [--dsweep 1024,4096,65536]
                                   [--methods naive,compile,fused,fused_rc]
(torch.compile recompiles for every shape and dtype; split a GPU run with --gxb / --dsweep if
one command must stay under a time limit.)
"""

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from kernels import fused_prdp_loss_triton, rdp_loss_triton, step_log_ratio_triton  # noqa: E402
from prdp_ds.logratio import gaussian_log_prob, guided_eps  # noqa: E402
from prdp_ds.loss import prdp_loss_reference, rdp_loss  # noqa: E402

GUIDANCE = 5.0  # paper CFG scale
CLIP = 1e-4  # stepwise clip range eps (large / multi-reward presets)
BETA = 3e-5  # KL weight beta (small / multi-reward presets)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# the three methods
# ----------------------------------------------------------------------------------------------
def naive_loss(eu, ec, er, xt, xp, lp_old, rewards, a, b, sigma, w, clip, beta):
    """The paper's way: log-probs for theta and ref by plain PyTorch ops, then the paper's loss.
    eu, ec: (G,B,T,D) UNet dtype; er, xt, xp: (G,B,T,D) fp32; lp_old: (G,B,T); a,b,sigma: (T,)."""
    G, B, T, D = eu.shape
    col = lambda c: c.view(1, 1, T, 1)  # noqa: E731
    eps = guided_eps(eu, ec, w)
    mu = col(a) * xt + col(b) * eps
    mu_ref = col(a) * xt + col(b) * er
    sig = sigma.repeat(G * B)
    lp = gaussian_log_prob(xp.reshape(-1, D), mu.reshape(-1, D), sig).view(G, B, T)
    lp_ref = gaussian_log_prob(xp.reshape(-1, D), mu_ref.reshape(-1, D), sig).view(G, B, T)
    loss = prdp_loss_reference(lp, lp_old, lp_ref, rewards, clip, beta)
    return loss, (lp - lp_ref).detach()


def fused_loss(eu, ec, er, xt, xp, r_old, rewards, a, b, sigma, w, clip, beta, backward):
    return fused_prdp_loss_triton(eu, ec, er, xt, xp, r_old, rewards, a, b, sigma, w, clip, beta, backward=backward)


FUSED = {"fused": "residual", "fused_rc": "recompute"}  # method -> the op's backward design


def design_bytes(method, s, c):
    """Bytes a design moves per latent element (module docstring) -> (fwd, fwd+bwd); None for the
    PyTorch methods (what they move is inductor's or eager's choice, not counted here)."""
    if method == "fused":
        return 2 * s + 3 * c + 4, 4 * s + 3 * c + 8
    if method == "fused_rc":
        return 2 * s + 3 * c, 6 * s + 5 * c
    return None, None


def fused_log_ratios(d):
    G, B, T, D = d["eu"].shape
    f = lambda t: t.reshape(-1, D)  # noqa: E731
    rep = lambda c: c.repeat(G * B)  # noqa: E731
    with torch.no_grad():
        r = step_log_ratio_triton(
            f(d["eu"]),
            f(d["ec"]),
            f(d["er"]),
            f(d["xt"]),
            f(d["xp"]),
            rep(d["a"]),
            rep(d["b"]),
            rep(d["sigma"]),
            GUIDANCE,
        )
    return r.view(G, B, T)


# ----------------------------------------------------------------------------------------------
# data and the fp64 reference
# ----------------------------------------------------------------------------------------------
def sd14_schedule(T):
    """(a, b, sigma) (T,) fp32 of SD1.4's DDIM eta=1 schedule (prdp_ds.sampler.step_schedule);
    a plain-numpy fallback when diffusers is missing."""
    try:
        from diffusers import DDIMScheduler

        from prdp_ds.models import SD14_SCHEDULER
        from prdp_ds.sampler import step_schedule

        s = step_schedule(DDIMScheduler(**SD14_SCHEDULER), T)
        return s.a, s.b, s.sigma
    except ImportError:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        ts = torch.arange(0, 1000, 1000 // T).flip(0) + 1
        ab_t = abar[ts]
        ab_prev = torch.where(ts - 1000 // T >= 0, abar[(ts - 1000 // T).clamp(min=0)], abar[0])
        var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        sig = var.sqrt()
        a = ab_prev.sqrt() / ab_t.sqrt()
        b = (1 - ab_prev - var).sqrt() - ab_prev.sqrt() * (1 - ab_t).sqrt() / ab_t.sqrt()
        return a.float(), b.float(), sig.float()


def _r64_rows(eh, er, xt, xp, a, b, s):
    """fp64 cancellation-free log-ratio per row; all (n, D) fp64, coefficients (n, 1)."""
    return (b * (eh - er) * (2 * xp - 2 * a * xt - b * (eh + er))).sum(1) / (2 * s.squeeze(1) ** 2)


def make_data(G, B, T, D, device, seed=0):
    """fp32 trajectories: eps_ref near the policy, x_prev sampled from the old policy (its eps_old a
    perturbation of the current eps_hat), r_old exact (fp64 -> fp32) and the paper-style stored
    old log-probs (fp32, by gaussian_log_prob)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (G, B, T, D)
    rn = lambda: torch.randn(shape, generator=g, device=device)  # noqa: E731
    a, b, sigma = (c.to(device) for c in sd14_schedule(T))
    col = lambda c: c.view(1, 1, T, 1)  # noqa: E731
    eu = rn()
    ec = eu + 0.1 * rn()
    eh = guided_eps(eu, ec, GUIDANCE)
    er = eh + 0.01 * rn()
    eps_old = eh + 0.001 * rn()
    xt = rn()
    xp = col(a) * xt + col(b) * eps_old + col(sigma) * rn()
    rows, chunk = G * B * T, _chunk_rows(D, device)
    sig_rows = sigma.repeat(G * B)
    r_old64 = torch.empty(rows, dtype=torch.float64, device=device)
    lp_old = torch.empty(rows, dtype=torch.float32, device=device)
    fl = lambda t: t.reshape(rows, D)  # noqa: E731
    coef64 = [c.double().repeat(G * B).view(-1, 1) for c in (a, b, sigma)]
    for i in range(0, rows, chunk):
        j = min(i + chunk, rows)
        sl = slice(i, j)
        c64 = [c[sl] for c in coef64]
        r_old64[sl] = _r64_rows(
            fl(eps_old)[sl].double(), fl(er)[sl].double(), fl(xt)[sl].double(), fl(xp)[sl].double(), *c64
        )
        mu_old = coef64[0][sl].float() * fl(xt)[sl] + coef64[1][sl].float() * fl(eps_old)[sl]
        lp_old[sl] = gaussian_log_prob(fl(xp)[sl], mu_old, sig_rows[sl])
    del eps_old, eh
    rewards = 0.27 + 0.01 * torch.randn((G, B), generator=g, device=device)
    return dict(
        eu=eu,
        ec=ec,
        er=er,
        xt=xt,
        xp=xp,
        a=a,
        b=b,
        sigma=sigma,
        rewards=rewards,
        r_old=r_old64.float().view(G, B, T),
        r_old64=r_old64.view(G, B, T),
        lp_old=lp_old.view(G, B, T),
    )


def _chunk_rows(D, device):
    return max(1, (1 << 24) // D) if device.type == "cuda" else max(1, (1 << 20) // D)


class Reference64:
    """Exact fp64 loss, log-ratios and gradients, by the two-pass method of docs/design.md §7 (pass 1: r in
    fp64 in chunks; loss and dL/dr by autograd; pass 2: per chunk, autograd of sum dL/dr * r)."""

    def __init__(self, d, eu, ec):
        G, B, T, D = eu.shape
        self.shape, self.rows, self.D = (G, B, T), G * B * T, D
        self.chunk = _chunk_rows(D, eu.device)
        self.f = lambda t: t.reshape(self.rows, D)
        self.t = [self.f(eu), self.f(ec), self.f(d["er"]), self.f(d["xt"]), self.f(d["xp"])]
        self.coef = [c.double().repeat(G * B).view(-1, 1) for c in (d["a"], d["b"], d["sigma"])]
        r = torch.empty(self.rows, dtype=torch.float64, device=eu.device)
        for i, j in self.chunks():
            with torch.no_grad():
                r[i:j] = self._r(i, j, *(x[i:j].double() for x in self.t[:2]))
        self.r = r.view(G, B, T)
        leaf = self.r.clone().requires_grad_()
        self.loss = rdp_loss(leaf, d["r_old64"], d["rewards"].double(), CLIP, BETA)
        self.g_r = torch.autograd.grad(self.loss, leaf)[0].reshape(-1)

    def chunks(self):
        for i in range(0, self.rows, self.chunk):
            yield i, min(i + self.chunk, self.rows)

    def _r(self, i, j, eu, ec):
        eh = eu + GUIDANCE * (ec - eu)
        er, xt, xp = (x[i:j].double() for x in self.t[2:])
        return _r64_rows(eh, er, xt, xp, *(c[i:j] for c in self.coef))

    def max_branch(self, d):
        """The RDP loss's part of the gradient error at this data: (dL/dr error of the kernel on the exact
        log-ratios rounded to fp32, relative to max |dL/dr|; share of valid pairs with e == e' in fp32)."""
        r32 = self.r.float().requires_grad_()
        (g,) = torch.autograd.grad(rdp_loss_triton(r32, d["r_old"], d["rewards"], CLIP, BETA), r32)
        err = (g.reshape(-1).double() - self.g_r).abs().max().item() / max(self.g_r.abs().max().item(), 1e-300)
        R = r32.detach().mean(-1)  # (G, B) fp32, as the kernel forms them
        C = torch.clamp(r32.detach(), d["r_old"] - CLIP, d["r_old"] + CLIP).mean(-1)
        rw = d["rewards"].float()
        target = (rw[:, :, None] - rw[:, None, :]) / BETA
        e, e_clip = R[:, :, None] - R[:, None, :] - target, C[:, :, None] - C[:, None, :] - target
        valid = target > 0
        tied = (e == e_clip)[valid].float().mean().item() if valid.any() else 0.0
        return err, tied

    def grad_error(self, grads):
        """max |g - g64| / max |g64| over both gradients, chunk by chunk."""
        num = den = 0.0
        for i, j in self.chunks():
            eu, ec = (x[i:j].detach().double().requires_grad_() for x in self.t[:2])
            g64 = torch.autograd.grad(self._r(i, j, eu, ec), (eu, ec), self.g_r[i:j])
            for g, ref in zip(grads, g64):
                num = max(num, (self.f(g)[i:j].double() - ref).abs().max().item())
                den = max(den, ref.abs().max().item())
        return num / den if den > 0 else num


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
def timer(device):
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def wall(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return wall


def copy_bandwidth(device, bench):
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    x = torch.empty(n, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9  # read + write, GB/s


def bench_method(name, fn, d, dtype, bench, copy_bw, ref, max_branch):
    """One row; max_branch: (dL/dr error, tied pair share) of Reference64.max_branch, for the fused rows."""
    device = d["eu"].device
    eu = d["eu"].to(dtype).detach().requires_grad_()
    ec = d["ec"].to(dtype).detach().requires_grad_()
    fused = name in FUSED
    old = d["r_old"] if fused else d["lp_old"]
    args = (eu, ec, d["er"], d["xt"], d["xp"], old, d["rewards"], d["a"], d["b"], d["sigma"], GUIDANCE, CLIP, BETA)
    loss_of = (lambda out: out) if fused else (lambda out: out[0])

    def fwd():
        return loss_of(fn(*args))

    def fwd_bwd():
        return torch.autograd.grad(loss_of(fn(*args)), (eu, ec))

    # errors (also the warm-up / compilation run)
    out = fn(*args)
    loss = loss_of(out)
    grads = torch.autograd.grad(loss, (eu, ec))
    r = fused_log_ratios(dict(d, eu=eu.detach(), ec=ec.detach())) if fused else out[1]
    loss_err = abs(loss.item() - ref.loss.item()) / max(abs(ref.loss.item()), 1e-300)
    grad_err = ref.grad_error(grads)
    lr_err = (r.double() - ref.r).abs().max().item()
    del out, loss, grads, r

    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        g = fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del g
    t_f, t_fb = bench(fwd), bench(fwd_bwd)

    G, B, T, D = eu.shape
    n = G * B * T * D
    small = G * B * T * 4 * 2 + G * B * 4
    es, cs = eu.element_size(), d["er"].element_size()  # s, c of the bytes accounting
    read = n * (2 * es + 3 * cs) + small  # floor: every input once
    fb = read + 2 * n * es  # + the two gradients once
    design_f, design_fb = design_bytes(name, es, cs)
    row = dict(
        G=G,
        B=B,
        T=T,
        D=D,
        dtype=str(dtype).replace("torch.", ""),
        method=name,
        fwd_ms=t_f,
        fwd_bwd_ms=t_fb,
        peak_mem_MB=peak,
        fwd_GBps=read / (t_f * 1e-3) / 1e9,
        fwd_pct_floor=100 * read / copy_bw / 1e9 / (t_f * 1e-3),
        fwd_bwd_GBps=fb / (t_fb * 1e-3) / 1e9,
        fwd_bwd_pct_floor=100 * fb / copy_bw / 1e9 / (t_fb * 1e-3),
        floor_B_per_elem_fwd_bwd=4 * es + 3 * cs,
        design_B_per_elem_fwd=design_f,
        design_B_per_elem_fwd_bwd=design_fb,
        design_fwd_bwd_GBps=design_fb * n / (t_fb * 1e-3) / 1e9 if design_fb else None,
        loss_rel_err=loss_err,
        grad_rel_err=grad_err,
        logratio_abs_err=lr_err,
        dLdr_rel_err=max_branch[0] if fused else None,
        tied_pair_frac=max_branch[1] if fused else None,
    )
    return row


def fmt(row):
    p, b, dl = row["peak_mem_MB"], row["design_B_per_elem_fwd_bwd"], row["dLdr_rel_err"]
    return (
        f"{row['G']:>3}x{row['B']:<3} T={row['T']:<3} D={row['D']:<6} {row['dtype']:<9} {row['method']:<8}"
        f" {row['fwd_ms']:9.3f} {row['fwd_bwd_ms']:9.3f} {f'{p:9.1f}' if p is not None else '      n/a'}"
        f" {row['fwd_bwd_GBps']:8.1f} {row['fwd_bwd_pct_floor']:6.1f}% {f'{b:4d}' if b else '   -'}"
        f"  {row['loss_rel_err']:9.2e} {row['grad_rel_err']:9.2e} {row['logratio_abs_err']:9.2e}"
        + (f" {dl:9.2e} {100 * row['tied_pair_frac']:5.1f}%" if dl is not None else "")
    )


HEADER = (
    f"{'GxB':<7} {'T':<5} {'D':<8} {'dtype':<9} {'method':<8} {'fwd ms':>9} {'f+b ms':>9} {'peak MB':>9}"
    f" {'f+b GB/s':>8} {'%floor':>7} {'B/el':>4}  {'loss err':>9} {'grad err':>9} {'lr err':>9}"
    f" {'dLdr err':>9} {'tied':>6}"
)


def summary(rows, timed):
    """Per shape and dtype: each fused design against compile (fwd+bwd and fwd speed-ups, compile ms / fused
    ms) and the issue's target, fused >= 1.0x compile forward+backward (None when not timed: the interpreter)."""
    key = lambda r: {k: r[k] for k in ("G", "B", "T", "D", "dtype")}  # noqa: E731
    out = []
    for c in (r for r in rows if r["method"] == "compile"):
        for f in (r for r in rows if r["method"] in FUSED and key(r) == key(c)):
            x = c["fwd_bwd_ms"] / f["fwd_bwd_ms"]
            out.append(
                key(c) | dict(method=f["method"], fwd_bwd_vs_compile=x, fwd_vs_compile=c["fwd_ms"] / f["fwd_ms"])
            )
            out[-1]["met"] = x >= 1.0 if timed else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows (with device, date, command) to this path")
    ap.add_argument("--dtypes", default="fp32,bf16", help="UNet output dtypes for eps_u/eps_c")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--gxb", default="1x8,8x8,16x16,64x8", help="GPU: G x B list at T=50, D=16384")
    ap.add_argument(
        "--dsweep",
        default="1024,4096,65536",
        help="GPU: D values for the 8x8, T=50, fp32 sweep ('' for none; 16384 is in the main rows)",
    )
    ap.add_argument("--methods", default="naive,compile,fused,fused_rc", help="which of the four methods to run")
    args = ap.parse_args()
    wanted = args.methods.split(",")
    unknown = sorted(set(wanted) - {"naive", "compile", *FUSED})
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from naive, compile, fused, fused_rc")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [DTYPES[x] for x in args.dtypes.split(",")]
    if cuda:
        dev_name = torch.cuda.get_device_name()
        gxb = [tuple(int(v) for v in x.split("x")) for x in args.gxb.split(",") if x]
        shapes = [(G, B, 50, 16384, dt) for G, B in gxb for dt in dtypes]
        shapes += [(8, 8, 50, int(D), torch.float32) for D in args.dsweep.split(",") if D]
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), TRITON_INTERPRET=1"
        shapes = [(2, 4, 4, 256, dt) for dt in dtypes]
        shapes += [(2, 4, 4, D, torch.float32) for D in (64, 1024)]
        shapes += [(8, 8, 50, 1024, torch.float32)]  # the paper-beta tie regime (benchmarks/results/gpu_h200.md)
        print("=" * 100)
        print("NO GPU: tiny sizes, Triton under TRITON_INTERPRET=1 (numpy). TIMINGS HERE MEAN NOTHING;")
        print("only the error columns are meaningful. Run on a GPU for the real table.")
        print("=" * 100)
    bench = timer(device)
    copy_bw = copy_bandwidth(device, bench)
    print(
        f"device: {dev_name}; copy bandwidth {copy_bw:.1f} GB/s; torch {torch.__version__}, triton {triton.__version__}"
    )
    print(
        f"CFG w={GUIDANCE}, clip eps={CLIP}, beta={BETA}; errors vs fp64: loss relative, grad max-abs/max|g|, "
        "log-ratio max abs (nats)"
    )
    methods = [("naive", naive_loss)] if "naive" in wanted else []
    if "compile" in wanted and not args.no_compile:
        try:
            methods.append(("compile", torch.compile(naive_loss, dynamic=False)))
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable, skipped: {type(e).__name__}: {e}")
    methods += [(m, functools.partial(fused_loss, backward=bw)) for m, bw in FUSED.items() if m in wanted]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    print(HEADER)
    rows, skipped = [], []

    def write_json():  # after every row: a run stopped at a time limit keeps what it measured
        if not args.json:
            return
        out = dict(
            device=dev_name,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join([Path(sys.executable).name] + sys.argv),
            torch=torch.__version__,
            triton=triton.__version__,
            interpreter=not cuda,
            copy_bandwidth_GBps=copy_bw,
            settings=dict(guidance=GUIDANCE, clip_range=CLIP, kl_weight=BETA),
            note=(
                "timings under the Triton interpreter on CPU mean nothing; only errors do"
                if not cuda
                else "median ms via triton.testing.do_bench"
            ),
            skipped=skipped,
            summary=summary(rows, timed=cuda),
            rows=rows,
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))

    for G, B, T, D, dt in shapes:
        d = make_data(G, B, T, D, device)
        ref = Reference64(d, d["eu"].to(dt), d["ec"].to(dt))
        max_branch = ref.max_branch(d) if any(m in FUSED for m, _ in methods) else None
        for name, fn in methods:
            try:
                row = bench_method(name, fn, d, dt, bench, copy_bw, ref, max_branch)
            except Exception as e:  # noqa: BLE001
                if name != "compile":
                    raise
                msg = f"torch.compile failed at G={G} B={B} T={T} D={D}: {type(e).__name__}: {str(e)[:200]}"
                print(msg)
                skipped.append(msg)
                methods = [m for m in methods if m[0] != "compile"]
                continue
            rows.append(row)
            print(fmt(row), flush=True)
            write_json()
        del d, ref
        if cuda:
            torch.cuda.empty_cache()
    for x in summary(rows, timed=cuda):
        print(
            f"{x['G']}x{x['B']} T={x['T']} D={x['D']} {x['dtype']} {x['method']}:"
            f" fwd+bwd {x['fwd_bwd_vs_compile']:.2f}x compile, fwd {x['fwd_vs_compile']:.2f}x;"
            f" target >= 1.0x {'n/a (interpreter)' if x['met'] is None else 'met' if x['met'] else 'NOT met'}"
        )
    if args.json:
        write_json()
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
