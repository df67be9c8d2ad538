"""Offline mode (paper §4.3, `algo.online: false`; docs/design.md §6): train on a fixed dataset sampled
once from the reference model instead of from the current policy.

The dataset holds, for every training epoch e, the rollout the online run would sample at epoch e
(the same prompts and per-image seeds) but drawn from pi_ref, with its rewards: the same number of
reward queries as the online run, and training then takes the same K optimizer steps per epoch.
Since the sampling policy is pi_ref throughout, r_old = 0 and eps_old = eps_ref (stored once), and
every optimizer step runs pass 1 (theta differs from the sampling policy after the first step).

Layout: OFFLINE_DIR/meta.json (what the dataset depends on) and epoch_XXXX_rankR.safetensors, one
per epoch and rank, each written under a .tmp name and renamed. Building skips files that exist,
so an interrupted build (or training run) continues where it stopped; a dataset made with other
settings (model, sampler, prompts, seeds, sizes, reward, world size) is refused, naming the key.
The files hold the latents themselves, so training reads the same rollouts on any device. The per-image
noise is drawn on the sampling device and its stream differs per device type (prdp_ds.sampler.image_noise):
meta.json records that type (`noise_device`; 'cpu' for datasets made before it was recorded), and a dataset
with missing rollouts (of any rank) is completed only on the device type it was started on.
Disk: (2T + 1) latents of fp32 per image, about 6.6 MB at SD size (T = 50, 4x64x64).
"""

import json
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from prdp_ds.config import later_sampler_settings
from prdp_ds.sampler import load_rollout, save_rollout


def dataset_meta(cfg, world_size, prompts_fingerprint, noise_device="cpu"):
    """Everything an offline rollout depends on, as a flat JSON-able dict. noise_device: the device type the
    rollouts are sampled on ('cpu', 'cuda'), which fixes their noise."""
    return {
        "model.pretrained": cfg.model.pretrained,
        "model.seed": cfg.model.seed,
        "model.lora_rank": cfg.model.lora_rank,
        "sampler.num_steps": cfg.sampler.num_steps,
        "sampler.guidance_scale": cfg.sampler.guidance_scale,
        "sampler.eta": cfg.sampler.eta,
        "sampler.spacing": cfg.sampler.spacing,
        **{f"sampler.{k}": v for k, v in later_sampler_settings(vars(cfg.sampler)).items()},
        "train.seed": cfg.train.seed,
        "train.prompts_per_epoch": cfg.train.prompts_per_epoch,
        "train.images_per_prompt": cfg.train.images_per_prompt,
        "prompts": prompts_fingerprint,
        "reward": json.dumps(cfg.reward, sort_keys=True),
        "world_size": world_size,
        "noise_device": noise_device,
    }


class OfflineDataset:
    def __init__(self, directory, meta, rank):
        self.dir, self.meta, self.rank = Path(directory), meta, rank

    def path(self, epoch):
        return self.dir / f"epoch_{epoch:04d}_rank{self.rank}.safetensors"

    def complete(self, epochs):
        """Whether every rank's rollout of every epoch is on disk."""
        ranks = range(self.meta["world_size"])
        return all((self.dir / f"epoch_{e:04d}_rank{r}.safetensors").is_file() for e in range(epochs) for r in ranks)

    def check_meta(self, sampling=True):
        """Rank 0 writes meta.json for a new dataset; a different existing one is an error. The noise device
        counts only when rollouts are still to be sampled (sampling=True): stored ones load on any device."""
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            saved = {"noise_device": "cpu", **json.loads(meta_file.read_text())}
            keys = sorted((set(saved) | set(self.meta)) - (set() if sampling else {"noise_device"}))
            diff = [k for k in keys if saved.get(k) != self.meta.get(k)]
            if diff:
                raise ValueError(
                    f"algo.offline_dir {self.dir}: the dataset there was made with other settings "
                    f"({', '.join(f'{k}: {saved.get(k)!r} there, {self.meta.get(k)!r} now' for k in diff)}); "
                    "use another algo.offline_dir or delete it"
                )
        elif self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = meta_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.meta, indent=1))
            tmp.replace(meta_file)

    def build(self, epochs, rollout_fn):
        """Sample and score every epoch's rollout that is not on disk yet. rollout_fn(epoch) ->
        (Trajectories, rewards (G, B), reward components), drawn from the reference model."""
        self.check_meta(sampling=not self.complete(epochs))
        if dist.is_initialized():
            dist.barrier()  # rank 0 made the folder
        missing = [e for e in range(epochs) if not self.path(e).is_file()]
        for epoch in tqdm(missing, disable=self.rank != 0 or not missing, desc="offline dataset", dynamic_ncols=True):
            save_rollout(self.path(epoch), *rollout_fn(epoch))
        if dist.is_initialized():
            dist.barrier()

    def load(self, epoch, schedule, device):
        return load_rollout(self.path(epoch), schedule, device)
