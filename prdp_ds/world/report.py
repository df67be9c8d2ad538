"""Write the weights folder's README.md from its records (training.json, classifier.json, samples.json).

python -m prdp_ds.world.report --weights prdp_ds/world/weights [--notes "text"]
"""

import argparse
import json
from pathlib import Path

from prdp_ds.world.model import WEIGHTS_DIR


def _load(path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_readme(weights=WEIGHTS_DIR, notes=""):
    weights = Path(weights)
    lines = [
        "# World model weights",
        "",
        "Written by `python -m prdp_ds.world.report` from the json records in this folder. "
        "All weights are safetensors.",
        "",
    ]
    tr = _load(weights / "training.json")
    if tr:
        m = tr["machine"]
        lines += [
            "## Base model (`unet.safetensors`, `text_encoder.safetensors`)",
            "",
            f"- command: `{tr['command']}`",
            f"- settings: {json.dumps(tr['settings'])}",
            f"- steps: {tr['steps']} in {tr['wall_s'] / 60:.1f} min wall "
            f"({tr['steps'] * tr['settings']['batch_size']:,} generated scenes)",
            f"- loss: first step {tr['first_loss']:.4f}, "
            f"mean of the last 200 steps {tr['final_loss_mean_last_200']:.4f} (`loss.png`)",
            f"- date: {tr['date']}; machine: {m['node']}, {m['platform']}, {m['cpu_count']} CPUs "
            f"(shared with other jobs), torch {m['torch']}, {m['torch_threads']} thread(s)",
            f"- parameters: UNet {tr['params']['unet']:,}, text encoder {tr['params']['text_encoder']:,} "
            "(mostly the 49,408 x 32 token embedding)",
            f"- {tr['weights']}",
            "",
        ]
    cl = _load(weights / "classifier.json")
    if cl:
        fmt = lambda d: ", ".join(f"{k} {v:.4f}" for k, v in d.items())  # noqa: E731
        lines += [
            "## Judge / alignment classifier (`classifier.safetensors`)",
            "",
            f"- command: `{cl['command']}`; {cl['steps']} steps of {cl['batch_size']} scenes, "
            f"{cl['wall_s'] / 60:.1f} min, {cl['params']:,} parameters, {cl['date']}",
            f"- held-out accuracy ({cl['heldout']}):",
            f"  - clean renders: {fmt(cl['heldout_accuracy_clean'])}",
            f"  - noisy/blurred renders: {fmt(cl['heldout_accuracy_noisy'])}",
            "",
        ]
    sa = _load(weights / "samples.json")
    if sa:
        lines += [
            "## Samples (`samples.png`)",
            "",
            f"- {len(sa['prompts'])} prompts x {len(sa['seeds'][0])} seeds, "
            + (
                f"flow SDE {sa['num_steps']} steps, noise level {sa['noise_level']}"
                if sa.get("flow")
                else f"DDIM {sa['num_steps']} steps, eta {sa['eta']}"
            )
            + f"; {sa['layout']}",
        ]
        for w, r in sa["results"].items():
            per = ", ".join(f"{k} {v:.2f}" for k, v in r["per_attribute"].items())
            lines.append(
                f"- guidance {w}: judge accuracy {r['judge_accuracy']:.3f} (per attribute: {per}); "
                f"mean alignment {r['alignment']:.3f}, aesthetic {r['aesthetic']:.3f}"
            )
        lines.append("")
    if notes:
        lines += ["## Notes", "", notes, ""]
    (weights / "README.md").write_text("\n".join(lines))
    return weights / "README.md"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--notes", default="")
    args = p.parse_args(argv)
    print(write_readme(args.weights, args.notes))


if __name__ == "__main__":
    main()
