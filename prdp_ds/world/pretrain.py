"""Pretrain the world's base model (UNet + text encoder jointly) on freshly generated scenes.

    python -m prdp_ds.world.pretrain --out prdp_ds/world/weights --minutes 30 --seed 0
    python -m prdp_ds.world.pretrain --out prdp_ds/world/weights_flow --steps 2500 --seed 0 --objective flow \
        --init prdp_ds/world/weights

Epsilon-prediction diffusion loss on the scenes' latents (model.PooledVAE.encode), mixing two means of the
per-sample eps-MSE: (1 - plain_share) x its mean weighted by w(t) = clamp(1 / snr(t), 1, high_noise_weight) plus
plain_share x its plain mean (`mixed_loss`; 0.5 and 30 by default). Why both: the background and the shape's
position are decided at t > ~600, where x_t no longer shows them and the plain eps-MSE weights an x0 error by
snr(t) < 0.03, so the plain loss alone taught neither word; the weight turns the loss there into a capped x0
error, but alone it starves the low-noise steps that draw the shape's outline; the plain half keeps them (the
runs that showed both: prdp_ds/world/weights/README.md). Classifier-free guidance dropout
(an empty caption 10% of the time), AdamW with warmup and a cosine decay over the budget (minutes or
steps), EMA weights (saved). Writes unet/text_encoder safetensors (fp16), training.json (command,
seed, steps, losses, date, machine), README.md and loss.png into --out.

--objective flow trains the flow-matching world instead (prdp_ds.world.model, `world_flow`): sigma ~ U(0, 1),
x_sigma = (1 - sigma) x0 + sigma eps, the UNet at time sigma * 1000 regresses the velocity v = eps - x0 (plain MSE),
with the same captions, dropout, optimizer, schedule and EMA. The shipped one starts from the DDIM world's weights
(--init, the second command): from scratch it learnt images but not the text (docs/world.md, "Pretraining").
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from prdp_ds.models import OpenClipTokenizer
from prdp_ds.world import scenes
from prdp_ds.world.model import (
    CONTEXT_LENGTH,
    SCHEDULER,
    PooledVAE,
    config_dict,
    count_params,
    load_parts,
    make_scheduler,
    new_parts,
    save_parts,
)

OBJECTIVES = ("eps", "flow")


def lr_at(progress, step, base_lr, warmup):
    return base_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def mixed_loss(mse, weight, plain_share):
    """(batch,) per-sample eps-MSE, (batch,) loss weights w(t) -> the scalar loss
    (1 - plain_share) * sum(w mse) / sum(w) + plain_share * mean(mse)."""
    return (1 - plain_share) * (weight * mse).sum() / weight.sum() + plain_share * mse.mean()


def train(
    out=None,
    minutes=None,
    steps=None,
    seed=0,
    batch_size=32,
    lr=1e-3,
    warmup=50,
    ema_decay=0.999,
    cfg_dropout=0.1,
    high_noise_weight=30.0,
    log_every=50,
    progress=True,
    command=None,
    unet_overrides=None,
    init=None,
    plain_share=0.5,
    objective="eps",
):
    """Train; returns a dict with the per-step losses and the (EMA) unet and text encoder.
    Stops at `steps` or after `minutes` of wall time, whichever comes first (at least one is needed).
    unet_overrides: UNet config changes (tests use a narrower UNet; the shipped model uses none).
    init: a weights folder to continue from (its EMA weights; fresh optimizer state).
    high_noise_weight: the cap of the loss weight clamp(1 / snr(t), 1, cap); 1 gives the plain eps-MSE.
    plain_share: the plain eps-MSE's share of the loss (mixed_loss), in [0, 1].
    objective: 'eps' (the DDIM world) or 'flow' (the flow-matching world: the velocity MSE, no weighting).
    losses: the plain (unweighted) eps-MSE (or v-MSE) per step, comparable across weightings."""
    if objective not in OBJECTIVES:
        raise ValueError(f"pretrain: objective must be one of {OBJECTIVES}, got {objective!r}")
    if high_noise_weight < 1:
        raise ValueError(f"pretrain: high_noise_weight must be >= 1, got {high_noise_weight}")
    if not 0 <= plain_share <= 1:
        raise ValueError(f"pretrain: plain_share must be in [0, 1], got {plain_share}")
    if minutes is None and steps is None:
        raise ValueError("pretrain: give --minutes or --steps")
    torch.manual_seed(seed)
    unet, text_encoder = new_parts(seed, unet_overrides) if init is None else load_parts(init)
    ema = list(new_parts(seed, unet_overrides))
    for e, m in zip(ema, (unet, text_encoder)):
        e.load_state_dict(m.state_dict())
        e.requires_grad_(False)
    unet.train()
    text_encoder.train()
    tokenizer = OpenClipTokenizer(CONTEXT_LENGTH)
    abar = make_scheduler(SCHEDULER).alphas_cumprod.float()
    T = abar.shape[0]
    weight_t = (abar / (1 - abar)).reciprocal().clamp(1.0, high_noise_weight)  # (T,)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    losses, lrs = [], []
    budget_s = None if minutes is None else minutes * 60
    start = time.time()
    bar = tqdm(total=steps, desc="pretrain", disable=not progress, dynamic_ncols=True, mininterval=5)
    step = 0
    while True:
        elapsed = time.time() - start
        if (steps is not None and step >= steps) or (budget_s is not None and elapsed >= budget_s):
            break
        frac = max(step / steps if steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        cur_lr = lr_at(frac, step, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        labels = scenes.sample_scenes(batch_size, seed=(seed * 1_000_003 + step) % 2**62)
        images, _ = scenes.render(labels)
        caps = scenes.captions(labels, seed=[seed, step])
        drop = torch.rand(batch_size, generator=g) < cfg_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        x0 = PooledVAE.encode(images)
        emb = text_encoder(tokenizer(caps))[0]
        if objective == "flow":
            sigma = torch.rand(batch_size, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            s = sigma.view(-1, 1, 1, 1)
            pred = unet((1 - s) * x0 + s * noise, sigma * 1000, emb).sample
            mse = (pred - (noise - x0)).pow(2).mean(dim=(1, 2, 3))  # (batch,)
            loss = mse.mean()
        else:
            t = torch.randint(0, T, (batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, emb).sample
            mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # (batch,)
            loss = mixed_loss(mse, weight_t[t], plain_share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in zip(ema, (unet, text_encoder)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        losses.append(mse.mean().item())
        lrs.append(cur_lr)
        step += 1
        bar.update(1)
        if step % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{cur_lr:.2e}")
            if not progress:
                print(f"step {step} loss {recent:.4f} elapsed {time.time() - start:.0f}s", flush=True)
    bar.close()
    wall = time.time() - start
    result = dict(losses=losses, lrs=lrs, steps=step, wall_s=wall, unet=ema[0], text_encoder=ema[1])
    if out is not None:
        write_outputs(
            out,
            result,
            dict(
                seed=seed,
                batch_size=batch_size,
                lr=lr,
                warmup=warmup,
                ema_decay=ema_decay,
                cfg_dropout=cfg_dropout,
                high_noise_weight=high_noise_weight,
                plain_share=plain_share,
                objective=objective,
                minutes=minutes,
                max_steps=steps,
                init=None if init is None else str(init),
            ),
            command,
            flow=objective == "flow",
        )
    return result


def smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_outputs(out, result, settings, command, flow=False):
    out = Path(out)
    save_parts(out, result["unet"], result["text_encoder"])
    losses = result["losses"]
    tail = losses[-min(200, len(losses)) :]
    record = dict(
        command=command or "python -m prdp_ds.world.pretrain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        settings=settings,
        steps=result["steps"],
        wall_s=round(result["wall_s"], 1),
        final_loss_mean_last_200=sum(tail) / len(tail),
        first_loss=losses[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(
            node=platform.node(),
            platform=platform.platform(),
            processor=platform.processor(),
            cpu_count=os.cpu_count(),
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
        ),
        params=dict(unet=count_params(result["unet"]), text_encoder=count_params(result["text_encoder"])),
        config=config_dict(flow),
        weights="EMA weights, stored as fp16 safetensors",
        losses=[round(x, 5) for x in losses],
    )
    (out / "training.json").write_text(json.dumps(record, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses, lw=0.5, alpha=0.35, label="per step")
        ax.plot(smooth(losses, 50), lw=1.5, label="mean of 50")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("velocity MSE" if flow else "epsilon MSE")
        ax.set_title(f"world pretraining: {result['steps']} steps, {result['wall_s'] / 60:.1f} min")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    from prdp_ds.world.report import write_readme

    write_readme(out)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument(
        "--high-noise-weight",
        type=float,
        default=30.0,
        help="cap of the loss weight clamp(1/snr(t), 1, cap) (1: plain eps-MSE)",
    )
    p.add_argument(
        "--plain-share",
        type=float,
        default=0.5,
        help="share s of the plain eps-MSE in the loss: (1 - s) weighted mean + s plain mean",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest on a shared 2-core machine: spin-waiting threads contend)",
    )
    p.add_argument("--init", help="continue from this weights folder (fresh optimizer)")
    p.add_argument(
        "--objective", default="eps", choices=OBJECTIVES, help="eps: the DDIM world; flow: the flow-matching world"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.minutes is None and args.steps is None:
        p.error("give --minutes or --steps")
    result = train(
        args.out,
        args.minutes,
        args.steps,
        args.seed,
        args.batch_size,
        args.lr,
        args.warmup,
        high_noise_weight=args.high_noise_weight,
        plain_share=args.plain_share,
        progress=not args.no_progress,
        init=args.init,
        objective=args.objective,
    )
    tail = result["losses"][-min(200, len(result["losses"])) :]
    print(
        f"done: {result['steps']} steps in {result['wall_s'] / 60:.1f} min, final loss {sum(tail) / len(tail):.4f}; "
        f"weights in {args.out}"
    )


if __name__ == "__main__":
    main()
