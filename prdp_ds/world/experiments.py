"""The paper in miniature: its experiments, re-run on the synthetic world (issue 7).

    python -m prdp_ds.world.experiments E1 [--seeds 0 1 2] [--out results/world/E1] [--quick]
    python -m prdp_ds.world.experiments --list

An experiment is a set of arms, each a training preset plus `--set` overrides. For every seed S it
trains each arm (`prdp_ds.train` with train.seed=S), then evaluates the base model and every arm's
final checkpoint together (`prdp_ds.evaluate` with --seed S: the same prompts and noise for every
model) on the experiment's prompt sets, with three scores: the alignment reward, the judge's verdict
(1 if every attribute the prompt states is recognised; its mean is the judged accuracy) and the
hackable image-only aesthetic reward. Then it aggregates over seeds.

Outputs in --out: runs/ARM/seed_S/ and eval/seed_S/ (each run and each seed's evaluation), results.json
and results.md (model x prompt set x score: mean and SE over seeds, paired differences to the base),
curves.png, grid_SET.png and (E1) sample_efficiency.png; their layout: docs/world.md. A rerun continues where
it stopped: a seed whose eval/seed_S/eval.json exists is reused as it is (its runs' metrics.jsonl are all the figures
need; delete eval/seed_S to redo it), finished runs are kept, an unfinished one resumes from its latest checkpoint
and the evaluation from its finished units. So adding a seed to a finished experiment trains only that seed, and
adding an arm trains and evaluates only that arm: for a seed evaluated without it, the new arms and the base sample
the seed's noise again (eval/seed_S/added_ARM/) and their rows join eval.json, each paired with its own base run.
--quick shrinks every run to a few images and steps: it checks the machinery (CI), not the science.

Runs in one process on the CPU (the world is small); it holds one process group for all its runs.
"""

import argparse
import dataclasses
import datetime
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from prdp_ds import config as config_lib

SCORES = ("world_alignment", "world_judge", "world_aesthetic")
EVAL_REWARD = "{world_alignment: 1.0, world_judge: 0.0, world_aesthetic: 0.0}"
# E3: the hackable image-only reward for 24 of the demo's epochs, where the hacking shows (results/world/README.md, E3)
AESTHETIC = [
    "reward={world_aesthetic: 1.0, world_alignment: 0.0, world_judge: 0.0}",
    "train.epochs=24",
]
DDPO = ["algo.name=ddpo"]  # same lr, sampler, prompts and reward queries as PRDP
# DPOK's defaults but its rate of value steps: one per 6 sampled images (docs/algorithms.md), 128 / 6 per epoch
DPOK = ["algo.name=dpok", "dpok.value_updates=21"]
NO_CLIP = ["loss.clip_range=1.0e9"]
# E2: the demo's learning does not carry over to other prompts, so at ~30 minutes per seed a prompt set of hundreds
# gets too few images per prompt to move (results/world/README.md, E2). 30 prompts, the demo's new lr and beta.
SEEN_30 = [
    "prompts.source=world_seen",
    "train.prompts_per_epoch=16",
    "train.images_per_prompt=8",
    "train.epochs=20",
    "train.lr=1.5e-4",
    "loss.kl_weight=0.01",
]
# E1, E4 and E5 ran at the demo's settings of before its beta sweep (results/world/demo/sweep.md)
DEMO_0 = ["loss.kl_weight=0.05", "train.lr=1.0e-4"]
QUICK = [
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=2",
    "sampler.num_steps=2",
    "train.images_per_chunk=4",
    "train.steps_per_chunk=2",
    "output.sample_every=1",
    "output.eval_images=1",
]
QUICK_EVAL = ["--max-prompts", "2"]  # and 1 image per prompt


@dataclasses.dataclass(frozen=True)
class Experiment:
    title: str
    claim: str  # the paper's claim this experiment checks
    arms: dict  # label -> (training preset, [--set overrides])
    prompt_sets: tuple  # evaluation prompt sets (registered names)
    samples: int = 8  # evaluation images per prompt per model
    sample_efficiency: bool = False  # also plot the training reward against reward queries (sample_efficiency.png)


EXPERIMENTS = {
    "E1": Experiment(
        "small scale: PRDP vs DDPO, DPOK and GRPO vs base on the demo's 4 world_demo prompts, alignment "
        "reward (paper Table 1)",
        "PRDP reaches a higher reward than DDPO on the training prompts, and both beat the base model.",
        {
            "prdp": ("demo", DEMO_0),
            "ddpo": ("demo", DEMO_0 + DDPO),
            "grpo": ("demo", DEMO_0 + ["algo.name=grpo"]),
            "dpok": ("demo", DEMO_0 + DPOK),
        },
        ("world_demo",),
        samples=64,
        sample_efficiency=True,
    ),
    "E2": Experiment(
        "many prompts, seen and unseen: the 30 world_seen prompts x 8 images, 16 prompts per epoch for 20 epochs; "
        "DDPO with and without per-prompt normalization (paper Table 2, Fig. 9)",
        "PRDP trains stably on many prompts and generalizes to unseen prompts; DDPO falls behind, and "
        "without per-prompt normalization it does worse.",
        {
            "prdp": ("world_large", SEEN_30),
            "ddpo": ("world_large", SEEN_30 + DDPO),
            "ddpo_no_norm": ("world_large", SEEN_30 + DDPO + ["ddpo.per_prompt_norm=false"]),
        },
        ("world_seen", "world_unseen"),
        samples=16,
    ),
    "E3": Experiment(
        "KL regularization against reward hacking: the image-only aesthetic reward for 24 of the demo's epochs, "
        "PRDP at beta 0.01 (the demo's) and 0.25, and DDPO (no KL term) (paper Fig. 8, 10)",
        "Smaller beta raises the reward faster; larger beta keeps the samples closer to the base model "
        "(here: the judge's accuracy on the prompts falls less).",
        {
            "prdp_beta_0.01": ("demo", AESTHETIC + ["loss.kl_weight=0.01"]),
            "prdp_beta_0.25": ("demo", AESTHETIC + ["loss.kl_weight=0.25"]),
            "ddpo": ("demo", AESTHETIC + DDPO),
        },
        ("world_demo",),
        samples=64,
    ),
    "E4": Experiment(
        "online vs offline at the demo's settings, same reward queries and gradient steps (paper Fig. 7)",
        "Online training reaches a clearly higher reward than offline training on trajectories sampled "
        "once from the base model.",
        {"online": ("demo", DEMO_0), "offline": ("demo", DEMO_0 + ["algo.online=false"])},
        ("world_demo",),
        samples=64,
    ),
    "F1": Experiment(
        "the flow-matching world: PRDP on world_flow (Flow-GRPO's SDE policy) at the demo's settings vs its base",
        "PRDP raises the judged accuracy of a flow-matching model, as it does for the DDIM world (E1).",
        {"prdp": ("demo_flow", [])},
        ("world_demo",),
        samples=64,
    ),
    "E5": Experiment(
        "the proximal clip at the demo's settings: PRDP with and without it on world_demo (paper Table 5)",
        "Removing the proximal clip lowers the reward (training is less stable).",
        {"clip": ("demo", DEMO_0), "no_clip": ("demo", DEMO_0 + NO_CLIP)},
        ("world_demo",),
        samples=64,
    ),
}


def arm_overrides(exp, arm, seed, quick):
    preset, sets = exp.arms[arm]
    return preset, [*sets, f"train.seed={seed}", *(QUICK if quick else [])]


def train_arm(run_dir, preset, overrides):
    """Train one arm into run_dir unless finished there; resume an unfinished run from its checkpoint. Returns
    whether it trained (False: finished before)."""
    from prdp_ds.train import main as train_main

    epochs = config_lib.resolve(preset, None, overrides).train.epochs
    metrics = run_dir / "metrics.jsonl"
    checkpointed = (run_dir / "checkpoints" / "latest").is_file()
    if checkpointed and any(
        json.loads(line)["epoch"] == epochs - 1 for line in metrics.read_text().splitlines() if line
    ):
        return False
    argv = ["--preset", preset, "--output-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]]
    train_main([*argv, "--resume", "latest"])  # a run that never checkpointed starts again from scratch
    return True


def evaluate_seed(exp, out, seed, quick, arms, ev_dir):
    """Evaluate the base and `arms` on the seed's noise into ev_dir; returns its eval.json."""
    from prdp_ds.evaluate import main as evaluate_main

    samples = 1 if quick else exp.samples
    argv = [
        "--train-config",
        str(out / "runs" / arms[0] / f"seed_{seed}" / "config.yaml"),
        "--seed",
        str(seed),
        "--reward",
        EVAL_REWARD,
        "--samples",
        str(samples),
        "--output-dir",
        str(ev_dir),
    ]
    argv += [a for arm in arms for a in ("--model", f"{arm}={out / 'runs' / arm / f'seed_{seed}'}")]
    argv += [a for s in exp.prompt_sets for a in ("--prompts", s)]
    evaluate_main(argv + (QUICK_EVAL if quick else []))
    return json.loads((ev_dir / "eval.json").read_text())


def merge_evals(stored, added, arms):
    """Join an evaluation of new arms to a seed's stored one (same settings but the models, same noise).

    The stored base row stays; each added arm keeps its paired difference to the base run it was evaluated
    with, which sampled the same noise (equal to the stored base up to the CPU's summation order)."""
    a, b = dict(stored["settings"]), dict(added["settings"])
    models = {**a.pop("models"), **b.pop("models")}
    if a != b:
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(f"cannot add arms {arms} to an evaluation made with other settings: {', '.join(changed)}")
    merged = json.loads(json.dumps(stored))
    merged["settings"]["models"] = models
    for arm in arms:
        merged["results"][arm] = added["results"][arm]
        merged["vs_base"][arm] = added["vs_base"][arm]
    return merged


def _mean_se(values):
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def aggregate(evals):
    """[eval.json per seed] -> {model: {set: {score: {mean, se, per_seed, vs_base: {mean, se}}}}}."""
    first = evals[0]["results"]
    out = {}
    for model, row in first.items():
        for pset in row:
            for score in SCORES:
                per_seed = [e["results"][model][pset][score]["mean"] for e in evals]
                mean, se = _mean_se(per_seed)
                cell = {"mean": mean, "se": se, "per_seed": per_seed}
                if model != "base":
                    d_mean, d_se = _mean_se([e["vs_base"][model][pset][score]["mean"] for e in evals])
                    cell["vs_base"] = {"mean": d_mean, "se": d_se}
                out.setdefault(model, {}).setdefault(pset, {})[score] = cell
    return out


def _fmt(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def markdown(name, exp, results, meta):
    lines = [
        f"# {name}: {exp.title}",
        "",
        f"Paper's claim: {exp.claim}",
        "",
        f"Seeds {meta['seeds']}; cells are the mean over seeds ± the standard error across seeds; in brackets, "
        "the paired difference to the base model (same prompts and noise). Each seed's evaluation: "
        f"{meta['samples']} images per prompt per model.",
        "",
    ]
    sets = list(exp.prompt_sets)
    for score in SCORES:
        lines += [f"## {score}", "", "| model | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for model, row in results.items():
            cells = []
            for s in sets:
                c = row[s][score]
                diff = f" ({c['vs_base']['mean']:+.3f} ± {_fmt(c['vs_base']['se'])})" if "vs_base" in c else ""
                cells.append(f"{c['mean']:.3f} ± {_fmt(c['se'])}{diff}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Provenance",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        "- wall time per seed (training and evaluation; finished runs skipped), from the invocation that ran it: "
        + "; ".join(f"seed {s}: {_wall(w)}" for s, w in meta["seed_wall_s"].items()),
        "",
    ]
    return "\n".join(lines)


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine():
    return (
        f"{platform.node()}, {platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def _walls(path):
    """A seed's wall-time records (eval/seed_S/wall.json): one per invocation that trained and evaluated arms of it,
    {'arms' (evaluated), 'trained' (trained here; the others had finished before), 'wall_s', 'machine', 'date',
    optionally 'note'} (a single record without 'arms': written before arms could be added; without 'trained':
    before it was recorded)."""
    if not path.is_file():
        return []
    walls = json.loads(path.read_text())
    return walls if isinstance(walls, list) else [walls]


def _wall(walls):
    if not walls:
        return "not recorded"
    return ", ".join(
        (f"{'+'.join(w['arms'])}: " if "arms" in w else "")
        + (f"(trained: {'+'.join(w['trained']) or 'none, evaluation only'}) " if "trained" in w else "")
        + f"{w['wall_s']} s ({w['date']}, {w['machine']})"
        + (f" [{w['note']}]" if "note" in w else "")
        for w in walls
    )


def run(name, seeds, out, quick=False):
    from prdp_ds.engine import init_distributed
    from prdp_ds.plot import plot_runs

    exp = EXPERIMENTS[name]
    out = Path(out)
    init_distributed()  # one group for every run of this process (DeepSpeed caches its groups)
    evals, seed_wall = [], {}
    for seed in seeds:
        ev_dir = out / "eval" / f"seed_{seed}"
        done, wall = ev_dir / "eval.json", ev_dir / "wall.json"
        stored = json.loads(done.read_text()) if done.is_file() else None
        walls = _walls(wall)
        arms = [a for a in exp.arms if stored is None or a not in stored["results"]]
        if arms:
            start, trained = time.time(), []
            for arm in arms:
                preset, overrides = arm_overrides(exp, arm, seed, quick)
                if train_arm(out / "runs" / arm / f"seed_{seed}", preset, overrides):
                    trained.append(arm)
            if stored is None:
                stored = evaluate_seed(exp, out, seed, quick, arms, ev_dir)
            else:
                added = evaluate_seed(exp, out, seed, quick, arms, ev_dir / f"added_{'_'.join(arms)}")
                stored = merge_evals(stored, added, arms)
                done.write_text(json.dumps(stored, indent=1))
            walls.append(
                {
                    "arms": arms,
                    "trained": trained,
                    "wall_s": round(time.time() - start, 1),
                    "machine": machine(),
                    "date": now(),
                }
            )
            wall.write_text(json.dumps(walls))
        else:  # evaluated by earlier invocations: reused, with the wall times measured then
            print(f"{name} seed {seed}: reusing {done}", flush=True)
        models = ["base", *exp.arms]  # the experiment's rows in its order, whatever else the file holds
        rows = {k: {m: stored[k][m] for m in models if m in stored[k]} for k in ("results", "vs_base")}
        evals.append({**stored, **rows})
        seed_wall[seed] = walls
    results = aggregate(evals)
    meta = {
        "experiment": name,
        "seeds": list(seeds),
        "quick": quick,
        "samples": evals[0]["settings"]["samples"],
        "command": shlex.join(["python", "-m", "prdp_ds.world.experiments", *sys.argv[1:]]),
        "date": now(),
        "machine": machine(),
        "seed_wall_s": seed_wall,
        "arms": {a: list(v) for a, v in exp.arms.items()},
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "claim": exp.claim, "results": results}, indent=1))
    (out / "results.md").write_text(markdown(name, exp, results, meta))
    runs = {arm: [out / "runs" / arm / f"seed_{s}" for s in seeds] for arm in exp.arms}
    plot_runs(
        runs,
        out / "curves.png",
        ["reward_mean", "eval/reward_mean", *[f"eval/{s}" for s in SCORES], "kl", "loss"],
    )
    if exp.sample_efficiency:  # the paper's main plot: reward on each epoch's fresh samples vs reward queries
        plot_runs(
            runs,
            out / "sample_efficiency.png",
            ["reward_mean", "reward/world_judge"],
            x="queries",
        )
    first = out / "eval" / f"seed_{seeds[0]}"
    for grid in first.glob("grids/*.png"):
        shutil.copyfile(grid, out / f"grid_{grid.name}")
    for grid in first.glob("added_*/grids/*.png"):  # an added arm's evaluation: grid_SET_added_ARM.png
        shutil.copyfile(grid, out / f"grid_{grid.stem}_{grid.parent.parent.name}.png")
    print((out / "results.md").read_text(), flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="prdp_ds.world.experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("experiment", nargs="?", help=f"one of {', '.join(EXPERIMENTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="output folder (default: results/world/EXPERIMENT)")
    p.add_argument("--quick", action="store_true", help="tiny runs that check the machinery, not the science")
    p.add_argument("--list", action="store_true", help="print the experiments and their arms")
    args = p.parse_args(argv)
    if args.list:
        for name, exp in EXPERIMENTS.items():
            print(
                f"{name}: {exp.title}\n  arms: "
                + "; ".join(f"{a} = {pr} {' '.join(o)}".rstrip() for a, (pr, o) in exp.arms.items())
            )
        return
    if args.experiment not in EXPERIMENTS:
        p.error(f"experiment {args.experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
    run(args.experiment, args.seeds, args.out or f"results/world/{args.experiment}", args.quick)


if __name__ == "__main__":
    main()
