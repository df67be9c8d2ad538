"""Run outputs on rank 0: metrics.jsonl (one object per epoch), TensorBoard events, sample grids
(samples/epoch_XXXX.png: rows = eval prompts, columns = fixed seeds, comparable across epochs)
and reward_curve.png (mean reward +- standard error per epoch)."""
import json
import math
from pathlib import Path

import torch


class RunLog:
    def __init__(self, output_dir, enabled):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            (self.dir / "samples").mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, record, resumed_from=None):
        """Append one epoch's metrics; on resume, lines of epochs >= resumed_from are dropped first."""
        if not self.enabled:
            return
        path = self.dir / "metrics.jsonl"
        if resumed_from is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < resumed_from]
            path.write_text("".join(line + "\n" for line in keep))
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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

    def plot_rewards(self):
        if not self.enabled or not (self.dir / "metrics.jsonl").exists():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line]
        epochs = [r["epoch"] for r in rows]
        mean = torch.tensor([r["reward_mean"] for r in rows])
        se = torch.tensor([r["reward_std"] / math.sqrt(max(r["num_images"], 1)) for r in rows])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, mean, marker="o", ms=3)
        ax.fill_between(epochs, mean - se, mean + se, alpha=0.3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("reward (mean ± s.e.)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.dir / "reward_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self):
        if self._tb is not None:
            self._tb.close()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
