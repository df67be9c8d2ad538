"""Prompt sets and the per-epoch prompt draw.

The draw is a pure function of (seed, epoch): every rank computes the same global list of N
prompts and takes its own contiguous slice of groups, so no prompt repeats across ranks within an
epoch (while N <= the set's size) and resuming needs only the epoch number.
"""
from pathlib import Path

import numpy as np

# The 45 common animals of DDPO / PRDP's small-scale experiments.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()


def load_prompts(source, template="{}"):
    """'animals' or a local .txt file (one prompt per line; blank lines skipped), templated."""
    if source == "animals":
        items = list(ANIMALS)
    else:
        path = Path(source)
        try:
            items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as err:
            raise ValueError(f"prompts.source: cannot read prompt file {source!r}: {err}") from err
        if not items:
            raise ValueError(f"prompts.source: prompt file {source!r} holds no prompts")
    if "{}" not in template:
        raise ValueError(f"prompts.template must contain '{{}}', got {template!r}")
    return [template.format(p) for p in items]


def epoch_prompts(prompts, num, seed, epoch):
    """The epoch's global list of `num` prompts: consecutive shuffles of the set, seeded by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(-(-num // len(prompts)))])
    return [prompts[i] for i in order[:num]]


def rank_slice(num_groups, rank, world_size):
    """The global group ids this rank owns (contiguous, equal shares)."""
    if num_groups % world_size:
        raise ValueError(f"train.prompts_per_epoch={num_groups} must be divisible by the world size {world_size}")
    per_rank = num_groups // world_size
    return list(range(rank * per_rank, (rank + 1) * per_rank))
