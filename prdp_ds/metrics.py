"""Run outputs on rank 0: metrics.jsonl (one object per epoch), prompts.jsonl (the prompts each
rank sampled per epoch), TensorBoard events, sample grids (samples/epoch_XXXX.png: rows = eval
prompts, columns = fixed seeds, comparable across epochs) and training_curves.png (prdp_ds.plot)."""

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


def _epoch(line):
    """The 'epoch' of a JSON line, or None for a line that does not parse."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return None


class RunLog:
    def __init__(self, output_dir, enabled):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            (self.dir / "samples").mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def _append(self, name, record, resumed_from):
        """Append a JSON line; on resume, lines of epochs >= resumed_from are dropped first (and a line torn by a
        kill, which can only be the last, of an epoch that is being redone)."""
        path = self.dir / name
        if resumed_from is not None and path.exists():
            epochs = [(line, _epoch(line)) for line in path.read_text().splitlines()]
            keep = [line for line, epoch in epochs if epoch is not None and epoch < resumed_from]
            path.write_text("".join(line + "\n" for line in keep))
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, record, resumed_from=None):
        """One epoch's metrics -> metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        self._append("metrics.jsonl", record, resumed_from)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, record["epoch"])
        self._tb.flush()

    def save_grid(self, epoch, images):
        """images: (rows, cols, 3, H, W) in [0, 1]."""
        if not self.enabled:
            return None
        from torchvision.utils import save_image

        path = self.dir / "samples" / f"epoch_{epoch:04d}.png"
        save_image(images.flatten(0, 1).float().cpu(), str(path), nrow=images.shape[1], padding=2)
        self._tb.add_images("samples", images.flatten(0, 1).float().cpu(), epoch)
        return path

    def log_prompts(self, epoch, per_rank, resumed_from=None):
        """The prompts each rank sampled this epoch -> prompts.jsonl ({"epoch", "ranks": [[...], ...]})."""
        if self.enabled:
            self._append("prompts.jsonl", {"epoch": epoch, "ranks": per_rank}, resumed_from)

    def plot_rewards(self):
        """training_curves.png: reward (± s.e.), components, loss, clip fraction, KL, grad norm."""
        if not self.enabled or not (self.dir / "metrics.jsonl").exists():
            return None
        from prdp_ds.plot import plot_runs

        return plot_runs({self.dir.name: [self.dir]}, self.dir / "training_curves.png")

    def close(self):
        if self._tb is not None:
            self._tb.close()


def logratio_noise(recomputed, recorded):
    """The log-ratio noise of the training path: d = r(theta_old) recomputed (pass 1) - r recorded by the sampler,
    both (G, B, T) on this rank, in nats, over all images of all ranks (collective when a group exists) ->
    {'logratio_noise_rms': sqrt(mean d^2), 'logratio_noise_max': max |d|, 'logratio_noise_rms_per_step': the T
    values sqrt(mean over images of d^2) at each step index}. Exactly 0 when both paths compute alike."""
    d = (recomputed.double() - recorded.double()).flatten(0, 1)  # (images, T)
    sums = torch.cat([(d**2).sum(dim=0), d.new_tensor([d.shape[0]])])
    peak = d.abs().max().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    per_step = (sums[:-1] / sums[-1]).sqrt()
    return {
        "logratio_noise_rms": (per_step**2).mean().sqrt().item(),
        "logratio_noise_max": peak.item(),
        "logratio_noise_rms_per_step": per_step.tolist(),
    }


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
