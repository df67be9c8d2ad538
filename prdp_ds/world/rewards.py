"""The world's rewards; prdp_ds.rewards.BUILTIN_REWARDS names them and imports this module on first use.

world_aesthetic: image only, and hackable by ignoring the prompt: a large, saturated, centred
    foreground scores highest whatever the prompt asked for. Score in [0, 1]:
    clean * (0.4 * foreground saturation + 0.35 * min(foreground area / 0.35, 1) + 0.25 * (1 - centroid distance)),
    the foreground being the pixels far from the background colour (the median of the border pixels), and
    clean = clamp(1 - max(TV - 0.08, 0) / 0.5, 0, 1) a penalty on pixel noise (TV = mean absolute
    difference of neighbouring pixels, vertical plus horizontal; ~0.05 for a clean scene).
world_alignment: the scene classifier's (prdp_ds/world/classifier.py) probability of each attribute
    the prompt states, averaged over the stated attributes (colour and shape always; size, position,
    background when stated). A prompt outside the world's grammar raises a CaptionParseError naming it.
world_judge: 1 where the judge finds every stated attribute, else 0 (weight 0: logged, not optimized).
judge_accuracy(images, prompts): the fraction of images whose predicted attributes all match what
    their prompt states.
"""

import torch

from prdp_ds.world import scenes
from prdp_ds.world.classifier import HEADS, load_classifier, predict


def aesthetic_score(images):
    """(n, 3, H, W) in [0, 1] -> (n,) image-only 'aesthetic' score in [0, 1]."""
    images = images.float()
    n, _, H, W = images.shape
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], -1)
    bg = border.median(-1).values.view(n, 3, 1, 1)
    dist = (images - bg).norm(dim=1)  # (n, H, W)
    mask = ((dist - 0.1) / 0.2).clamp(0, 1)
    area = mask.mean((1, 2))
    sat = images.amax(1) - images.amin(1)
    sat_fg = (mask * sat).sum((1, 2)) / (mask.sum((1, 2)) + 1e-6)
    ys = (torch.arange(H, dtype=torch.float32, device=images.device) + 0.5) / H - 0.5
    xs = (torch.arange(W, dtype=torch.float32, device=images.device) + 0.5) / W - 0.5
    total = mask.sum((1, 2)) + 1e-6
    cy = (mask.sum(2) * ys).sum(1) / total
    cx = (mask.sum(1) * xs).sum(1) / total
    centred = 1 - (cx**2 + cy**2).sqrt() / (0.5 * 2**0.5)
    centred = torch.where(area > 1e-4, centred, torch.zeros_like(centred))
    tv = (images[:, :, 1:] - images[:, :, :-1]).abs().mean((1, 2, 3)) + (images[..., 1:] - images[..., :-1]).abs().mean(
        (1, 2, 3)
    )
    clean = (1 - (tv - 0.08).clamp(min=0) / 0.5).clamp(0, 1)  # noise is not a 'large saturated shape'
    return clean * (0.4 * sat_fg + 0.35 * (area / 0.35).clamp(max=1) + 0.25 * centred)


def parse_prompts(prompts):
    """prompts -> list of stated-attribute dicts (label indices); raises CaptionParseError naming a bad prompt."""
    out = []
    for p in prompts:
        names = scenes.parse_caption(p)
        out.append({k: scenes.ATTRIBUTES[k].index(v) for k, v in names.items()})
    return out


def _stated_probs(probs, parsed):
    """-> (n, 5) probability of the stated value per attribute, and the (n, 5) stated mask."""
    n = len(parsed)
    keys = list(HEADS)
    p = torch.zeros(n, len(keys))
    stated = torch.zeros(n, len(keys), dtype=torch.bool)
    for i, attrs in enumerate(parsed):
        for j, k in enumerate(keys):
            if k in attrs:
                p[i, j] = probs[k][i, attrs[k]]
                stated[i, j] = True
    return p, stated


def alignment_score(images, prompts, classifier=None):
    """(n,) mean over the prompt's stated attributes of the classifier's probability of the stated value."""
    parsed = parse_prompts(prompts)
    model = classifier or load_classifier(device=images.device)
    probs = {k: v.float().cpu() for k, v in predict(model, images.float()).items()}
    p, stated = _stated_probs(probs, parsed)
    return (p * stated).sum(1) / stated.sum(1)


@torch.no_grad()
def judge(images, prompts, classifier=None):
    """(n,) bool: every attribute the prompt states is the classifier's top prediction."""
    parsed = parse_prompts(prompts)
    model = classifier or load_classifier(device=images.device)
    probs = {k: v.float().cpu() for k, v in predict(model, images.float()).items()}
    ok = torch.ones(len(parsed), dtype=torch.bool)
    for i, attrs in enumerate(parsed):
        for k, v in attrs.items():
            ok[i] &= bool(probs[k][i].argmax() == v)
    return ok


def judge_accuracy(images, prompts, classifier=None):
    """Fraction of images whose predicted attributes all match what their prompt states."""
    return judge(images, prompts, classifier).float().mean().item()


def world_aesthetic(device="cpu"):
    @torch.no_grad()
    def reward(images, prompts):
        return aesthetic_score(images.to(device)).cpu()

    return reward


def _classifier_reward(score, weights, device):
    """A registry reward scoring (images, prompts) with the scene classifier loaded once from `weights`."""
    model = load_classifier(weights, device)

    @torch.no_grad()
    def reward(images, prompts):
        return score(images.to(device), list(prompts), model).float().cpu()

    return reward


def world_alignment(device="cpu", weights=None):
    """weights: a folder holding classifier.safetensors (default: the shipped prdp_ds/world/weights)."""
    return _classifier_reward(alignment_score, weights, device)


def world_judge(device="cpu", weights=None):
    """1.0 where the judge finds every stated attribute, else 0.0; log it with weight 0 to track accuracy."""
    return _classifier_reward(judge, weights, device)
