"""Helpers shared by several test files (a test file never imports another): the tiny two-pass setup
(test_twopass, test_ddpo, test_lora), the full-graph reference of GRPO's and DPOK's objectives (test_grpo,
test_dpok), end-to-end trainer runs (test_train, test_offline, test_faults) and a tiny model in the Stable Diffusion
folder layout (test_models, test_faults). The `rollout` fixture lives in conftest.py."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import fault_injection
import torch

from prdp_ds.config import Config
from prdp_ds.engine import build_ds_config, make_engine
from prdp_ds.logratio import guided_eps
from prdp_ds.models import OpenClipTokenizer
from prdp_ds.sampler import cfg_predict

REPO = Path(__file__).resolve().parent.parent
W, T, G, B = 5.0, 4, 2, 3


class RecordingSGD(torch.optim.Optimizer):
    """SGD that records the gradients DeepSpeed hands it (ZeRO's flat fp32 partitions)."""

    def __init__(self, params, lr, max_change=None):
        super().__init__(params, {"lr": lr})
        self.seen = []
        self.max_change = max_change  # if set, scale the step so no parameter moves more than this

    @torch.no_grad()
    def step(self, closure=None):
        grad = torch.cat([p.grad.detach().flatten().clone() for g in self.param_groups for p in g["params"]])
        self.seen.append(grad)
        lr = self.max_change / max(grad.abs().max().item(), 1e-30) if self.max_change else self.param_groups[0]["lr"]
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-lr)


def _cfg(steps_per_chunk, images_per_chunk, clip_range):
    cfg = Config()
    cfg.sampler.num_steps, cfg.sampler.guidance_scale = T, W
    cfg.train.steps_per_chunk, cfg.train.images_per_chunk = steps_per_chunk, images_per_chunk
    cfg.train.prompts_per_epoch, cfg.train.images_per_prompt, cfg.train.grad_clip = G, B, 0.0
    cfg.loss.kl_weight, cfg.loss.clip_range = 0.05, clip_range
    return cfg


def full_graph_log_ratios(unet, models, traj, against="eps_ref"):
    """log pi_theta - log pi_{against} (G * B, T_w), with grad through all T_w recorded UNet calls of every image
    (T_w: the trajectory's recorded steps; cfg_predict: the CFG pair, or one call of a guidance-distilled model),
    in the dtype of the UNet's parameters: docs/design.md §4's formula written out, sum over latent elements."""
    unet.zero_grad(set_to_none=True)
    dtype = next(unet.parameters()).dtype
    s = traj.schedule
    n = traj.seeds.numel()
    cond = models.encode_prompts(traj.flat_prompts)
    uncond = models.encode_prompts([""]).expand(n, -1, -1)
    lat, other = traj.flat("latents").to(dtype), traj.flat(against).to(dtype)
    ratios = []
    for k in range(traj.log_ratio_old.shape[2]):
        x = lat[:, k]
        eps = guided_eps(*(o.to(dtype) for o in cfg_predict(unet, x, s.timesteps[k].expand(n), cond, uncond, W)), W)
        a, b, sigma = (c[k].to(dtype) for c in (s.a, s.b, s.sigma))
        r = b * (eps - other[:, k]) * (2 * lat[:, k + 1] - 2 * a * x - b * (eps + other[:, k]))
        ratios.append(r.flatten(1).sum(1) / (2 * sigma**2))
    return torch.stack(ratios, dim=1)


def _engine(models, cfg, lr, max_change=None, checkpointing=False):
    unet = copy.deepcopy(models.unet)
    if checkpointing:  # what model.gradient_checkpointing turns on (diffusers: use_reentrant=False)
        unet.enable_gradient_checkpointing()
        assert unet.is_gradient_checkpointing
    opt = RecordingSGD(unet.parameters(), lr, max_change)
    ds = build_ds_config({"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}, cfg, 1)
    return make_engine(unet, ds, opt), opt


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


SMALL = [
    "--set",
    "sampler.num_steps=3",
    "--set",
    "train.prompts_per_epoch=4",
    "--set",
    "train.images_per_prompt=4",
    "--set",
    "train.steps_per_epoch=2",
    "--set",
    "output.sample_every=0",
    "--set",
    "train.images_per_chunk=8",
    "--set",
    "train.steps_per_chunk=2",
]
TIMING = ("sample_s", "train_s", "images_per_s", "peak_mem_mb")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, ranks=1, check=True, threads=None):
    """`python -m prdp_ds.train ARGS` (the `tiny_demo` preset unless ARGS name a preset or config file) ->
    subprocess.CompletedProcess. One rank: forked from a server that imported the trainer once
    (tests/fault_injection.py), else under the deepspeed launcher with one torch thread per rank (unless `threads`)."""
    if "--preset" not in args and "--train-config" not in args:
        args = ["--preset", "tiny_demo", *args]
    if ranks == 1:
        cmd = [sys.executable, "-m", "prdp_ds.train", *args]
        proc = subprocess.CompletedProcess(cmd, *fault_injection.run_train(args, threads=threads, cwd=REPO))
    else:  # one torch thread per rank: two ranks x two threads on 2 cores run several times slower
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_port()), "OMP_NUM_THREADS": str(threads or 1)}
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks)]
        cmd = [*launcher, "--master_port", env["MASTER_PORT"], "--module", "prdp_ds.train", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def start_until(cmd, marker, env=None):
    """Start `cmd` in the repository (stdout and stderr piped together) and read its output up to the first line
    holding `marker` -> (the process, the lines read). The caller reads the rest and waits."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
    return proc, lines


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def save_sd_folder(models, root):
    """Write tiny models in the diffusers Stable Diffusion layout, tokenizer files included."""
    models.unet.save_pretrained(root / "unet")
    models.vae.save_pretrained(root / "vae")
    models.text_encoder.save_pretrained(root / "text_encoder")
    models.scheduler.save_pretrained(root / "scheduler")
    bpe = OpenClipTokenizer(16)._tok
    (root / "tokenizer").mkdir()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF spelling
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({specials.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 16, "pad_token": "!"})
    )  # id 0, as open_clip pads


def full_graph_surrogate_grad(unet, models, traj, adv, terms, subset, dtype):
    """A per-step ratio objective (GRPO's, DPOK's) through every selected UNet call of every image in one graph, in
    `dtype`, one backward -> the flat fp64 gradient. adv: (G, B) or (G, B, T); terms(log_ratio (n, k) per-element
    mean, adv (n, 1) or (n, k), KL_t (n, k) per-element mean) -> (n, k); the loss is their mean."""
    unet = copy.deepcopy(unet).to(dtype)
    s, n = traj.schedule, G * B
    cond = models.encode_prompts(traj.flat_prompts).to(dtype)
    uncond = models.encode_prompts([""]).to(dtype).expand(n, -1, -1)
    lat, old, ref = (traj.flat(name).to(dtype) for name in ("latents", "eps_old", "eps_ref"))
    D, out_terms = lat[0, 0].numel(), []
    flat_adv = adv.reshape(n, -1).to(dtype)
    for k in subset.tolist():
        x = lat[:, k]
        out = unet(torch.cat([x, x]), s.timesteps[k].expand(2 * n), torch.cat([uncond, cond])).sample
        eps = out[:n] + W * (out[n:] - out[:n])
        a, b, sigma = (c[k].to(dtype) for c in (s.a, s.b, s.sigma))
        r = (b * (eps - old[:, k]) * (2 * lat[:, k + 1] - 2 * a * x - b * (eps + old[:, k]))).flatten(1).sum(1)
        kl = ((b * (eps - ref[:, k])) ** 2).flatten(1).sum(1) / (2 * sigma**2 * D)
        a_k = flat_adv[:, k : k + 1] if flat_adv.shape[1] > 1 else flat_adv
        out_terms.append(terms((r / (2 * sigma**2 * D))[:, None], a_k, kl[:, None]))
    torch.cat(out_terms, dim=1).mean().backward()
    return torch.cat([p.grad.flatten() for p in unet.parameters()]).double()


class Payload:
    """Unpickles into os.mkdir(path): what a malicious checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)
