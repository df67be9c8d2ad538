"""A small CNN that reads a world scene's attributes (colour, shape, size, position, background):
the world's alignment reward and judge.

    python -m prdp_ds.world.classifier --out prdp_ds/world/weights --steps 1200

Trained on freshly rendered scenes (all (colour, shape) pairs, held-out ones included: the judge
must know them) with augmentations that mimic a diffusion model's output (Gaussian noise, blur,
contrast/brightness jitter). Writes classifier.safetensors and classifier.json (held-out accuracy
per attribute on clean and on noisy renders of fresh seeds, the command, steps, time, date).
"""

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prdp_ds.world import scenes

WEIGHTS_DIR = Path(__file__).parent / "weights"
HEADS = {k: len(v) for k, v in scenes.ATTRIBUTES.items()}


class SceneClassifier(nn.Module):
    """(n, 3, 32, 32) images in [0, 1] -> {attribute: (n, classes) logits}."""

    def __init__(self, width=16):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(5, w), block(w, 2 * w), block(2 * w, 2 * w))  # 32 -> 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in HEADS.items()})
        coords = torch.linspace(-1, 1, scenes.RES)
        self.register_buffer("coords", torch.stack(torch.meshgrid(coords, coords, indexing="ij")), persistent=False)

    def forward(self, images):
        x = torch.cat([images * 2 - 1, self.coords.expand(images.shape[0], -1, -1, -1)], 1)  # coord channels: position
        h = self.fc(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


def augment(images, g):
    n = images.shape[0]
    blur = torch.rand(n, generator=g) < 0.4
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), k, groups=3)
        images = torch.where(blur.view(n, 1, 1, 1), blurred, images)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * 0.15
    bright = (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * 0.06
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean + bright
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.12
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)


def predict(model, images, batch_size=256):
    """images -> {attribute: (n, classes) probabilities}."""
    outs = []
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch_size):
            outs.append({k: v.softmax(-1) for k, v in model(images[lo : lo + batch_size]).items()})
    return {k: torch.cat([o[k] for o in outs]) for k in HEADS}


def accuracy(model, n=4000, seed=10_000_019, noisy=False):
    """Per-attribute accuracy on fresh scenes (a seed never used in training), all pairs included."""
    model.eval()
    labels = scenes.sample_scenes(n, seed, include_held_out=True)
    images, _ = scenes.render(labels)
    if noisy:
        images = augment(images, torch.Generator().manual_seed(seed))
    probs = predict(model, images)
    acc = {k: (probs[k].argmax(-1) == labels[k]).float().mean().item() for k in HEADS}
    acc["all"] = torch.stack([probs[k].argmax(-1) == labels[k] for k in HEADS]).all(0).float().mean().item()
    return acc


def train(steps=1200, batch_size=64, lr=2e-3, seed=0, progress=True):
    torch.manual_seed(seed)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed + 7)
    model.train()
    losses = []
    from tqdm import tqdm

    for step in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=5):
        labels = scenes.sample_scenes(batch_size, seed=(seed * 7_919 + step) % 2**62, include_held_out=True)
        images, _ = scenes.render(labels)
        logits = model(augment(images, g))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


def save(model, out, record):
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "classifier.safetensors"))
    (out / "classifier.json").write_text(json.dumps(record, indent=1))


_CACHE = {}


def load_classifier(weights=None, device="cpu"):
    """The shipped (or given) classifier, eval mode, frozen; cached per (path, device)."""
    from safetensors.torch import load_file

    path = Path(weights or WEIGHTS_DIR) / "classifier.safetensors"
    key = (str(path), str(device))
    if key not in _CACHE:
        if not path.is_file():
            raise FileNotFoundError(
                f"world classifier weights {path} not found; train them with "
                f"`python -m prdp_ds.world.classifier --out {path.parent}`"
            )
        model = SceneClassifier()
        model.load_state_dict(load_file(str(path)))
        _CACHE[key] = model.to(device).eval().requires_grad_(False)
    return _CACHE[key]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model, losses = train(args.steps, args.batch_size, seed=args.seed)
    wall = time.time() - start
    clean, noisy = accuracy(model), accuracy(model, noisy=True)
    record = dict(
        command="python -m prdp_ds.world.classifier " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        wall_s=round(wall, 1),
        final_loss_mean_last_50=sum(losses[-50:]) / len(losses[-50:]),
        heldout_accuracy_clean=clean,
        heldout_accuracy_noisy=noisy,
        heldout="4000 fresh scenes (seed 10000019, all colour/shape pairs); noisy = training augmentations",
        params=sum(p.numel() for p in model.parameters()),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(),
    )
    save(model, args.out, record)
    print(
        json.dumps(
            {k: record[k] for k in ("steps", "wall_s", "heldout_accuracy_clean", "heldout_accuracy_noisy")}, indent=1
        )
    )


if __name__ == "__main__":
    main()
