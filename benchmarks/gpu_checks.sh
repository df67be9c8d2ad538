#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run with a time limit per stage (so a slow stage cannot
# starve the rest). Stages, in order (STAGES picks a subset; default "tests epoch": one short GPU loan):
#   tests  the kernel tests compiled for the GPU (and torch.clamp's subgradient at a bound, printed)
#   epoch  benchmarks/epoch.py: whole PRDP epochs at SD1.4 size, per phase, before and after each lever,
#          T = 10 and 50, the noise floor per precision, torch.compile last (its own stage budgets, in its header)
#   world  the world trained at GPU batch sizes (PRDP and DDPO side by side, fp32: in bf16 the world's
#          log-ratios were noise, measured on its pixel model, benchmarks/results/gpu_h200.md), evaluated
#          against the base
#   loss   the loss-kernel benchmark
#   step   the SD1.4-size train-step benchmark, two-pass with the kernels, T = 50 (one cold run) and
#          T = 10 (warm: second of two runs); peak memory against T
#   naive  the same benchmark's full-graph method (largest T that fits)
#   flow   the train-step benchmark at SD3.5-medium and FLUX.1-dev size (random weights; FLUX with LoRA rank 64),
#          two-pass with the kernels, T = 10 (Flow-GRPO's training T for SD3.5-M), 512 px, warm (second of two runs)
#
#   [STAGES="tests world"] [WORLD_SECONDS=150] bash benchmarks/gpu_checks.sh OUT_DIR
#
# Time limits (seconds of GPU time): the default stages fit one 10-minute loan with the machine's start:
#   environment ~15 (nvidia-smi, imports) + tests 60 (34.6 measured on an H200) + epoch 500 = 575.
# Not in the default (each its own loan or what is left of one): world 2 x WORLD_SECONDS + 90 (390 at the
# default 150: alone it would take most of a loan, and it measures training dynamics, not speed), loss 130,
# step 2 x 120 and naive 150 (train_step.py: single steps and the full-graph comparison; epoch supersedes step),
# flow 180 (SD3.5-M) + 300 (FLUX) = 480 (with the machine's start, one 10-minute loan alone).
# Without nvidia-smi (a CPU machine) this is a rehearsal: the default stages are "epoch" only, which runs
# epoch.py's CPU plan on the tiny UNet (about a minute on 2 cores); "flow" runs train_step.py on tiny_sd3 and
# tiny_flux at T = 2 instead (120 each).
#
# Writes OUT_DIR/all.log (everything printed), epoch.json, loss_kernel.json, train_step_T50.json,
# train_step_T10.json, train_step_naive.json, train_step_sd35m.json, train_step_flux.json and world_gpu.tar.gz (the
# two runs' configs, metrics and sample grids, and the evaluation; no checkpoints), each from its stage. Each world run trains for WORLD_SECONDS and
# is then stopped by SIGTERM, on which the trainer checkpoints and exits.
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
PY=${PYTHON:-python3}
WORLD_SECONDS=${WORLD_SECONDS:-150}
if command -v nvidia-smi > /dev/null; then GPU=1; else GPU=0; fi
STAGES=" ${STAGES:-$( ((GPU)) && echo tests epoch || echo epoch)} "
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/all.log") 2>&1
stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
wants() { [[ $STAGES == *" $1 "* ]]; }

stage "environment"
if ((GPU)); then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
else
    echo "no nvidia-smi: CPU rehearsal (stages:$STAGES); the GPU numbers need a GPU"
fi
$PY -c "import torch, triton, diffusers, deepspeed, transformers, open_clip
print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__,
      'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')
import kernels, prdp_ds.train, prdp_ds.evaluate" || { echo "imports failed: stopping"; exit 3; }

if wants tests; then
    stage "kernel tests and the auto-chunk memory probe on the GPU"
    timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_package.py tests/test_step_logratio.py \
        tests/test_rdp_loss_kernel.py tests/test_chunking.py
    $PY -c "import torch
for dev in ('cpu', 'cuda'):
    r = torch.tensor([0.25, 0.5, 0.75], device=dev, requires_grad=True)
    torch.clamp(r, torch.full_like(r, 0.25), torch.full_like(r, 0.75)).sum().backward()
    print('torch', torch.__version__, dev, 'd clamp(r, 0.25, 0.75) / dr at r = 0.25, 0.5, 0.75:', r.grad.tolist())"
fi

if wants epoch; then
    stage "epoch benchmark: SD1.4 UNet (tiny on a CPU), levers, T = 10 and 50, precisions, compile last"
    timeout -k 10 500 $PY benchmarks/epoch.py --json "$OUT/epoch.json"
fi

if wants world; then
    stage "world at GPU batch sizes: PRDP and DDPO, ${WORLD_SECONDS}s each, side by side"
    W=$(mktemp -d)
    PIDS=()
    WORLD_SET=(--preset world --set sampler.spacing=quadratic --set train.epochs=1000
               --set train.prompts_per_epoch=18 --set train.images_per_prompt=32 --set sampler.batch_size=576
               --set train.images_per_chunk=96 --set train.steps_per_chunk=10
               --set output.save_every=10 --set output.sample_every=10)
    for algo in prdp ddpo; do
        timeout -k 30 "$WORLD_SECONDS" $PY -m prdp_ds.train --config ds_configs/zero2_fp32.json "${WORLD_SET[@]}" \
            --set algo.name=$algo \
            --output-dir "$W/$algo" > "$W/$algo.log" 2>&1 &
        PIDS+=($!)
    done
    wait "${PIDS[@]}"  # not a bare wait: that would also wait for the tee behind the log
    for algo in prdp ddpo; do echo "--- $algo"; tail -n 4 "$W/$algo.log"; done
    MODELS=()
    for algo in prdp ddpo; do
        ckpts=($(ls -d "$W/$algo"/checkpoints/epoch_* 2>/dev/null | sort))
        n=${#ckpts[@]}
        (( n >= 2 )) && MODELS+=(--model "${algo}_$(basename "${ckpts[(n-1)/2]}")=${ckpts[(n-1)/2]}")
        (( n >= 1 )) && MODELS+=(--model "${algo}_$(basename "${ckpts[n-1]}")=${ckpts[n-1]}")
    done
    if (( ${#MODELS[@]} )); then
        timeout 90 $PY -m prdp_ds.evaluate --preset world --spacing quadratic --seed 0 "${MODELS[@]}" \
            --prompts world_small --samples 32 --batch-size 576 --precision fp32 --output-dir "$W/eval" \
            --reward "{world_alignment: 1.0, world_judge: 0.0, world_aesthetic: 0.0}"
    fi
    tar -czf "$OUT/world_gpu.tar.gz" -C "$W" --exclude checkpoints --exclude tensorboard --exclude partial .
fi

if wants loss; then
    stage "loss-kernel benchmark"
    timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_fused.py
    timeout 200 $PY benchmarks/loss_kernel.py --gxb 64x8,8x8 --dsweep 1024,4096,65536 --json "$OUT/loss_kernel.json"
fi

if wants step; then
    for T in 50 10; do
        stage "train-step benchmark, SD1.4 UNet, two-pass with the kernels, T = $T"
        timeout 120 $PY benchmarks/train_step.py --unet sd14 --T $T --methods triton --repeats $((T > 10 ? 1 : 2)) \
            --json "$OUT/train_step_T$T.json"
    done
fi

if wants naive; then
    stage "train-step benchmark, SD1.4 UNet, full-graph backprop (largest T that fits)"
    timeout 150 $PY benchmarks/train_step.py --unet sd14 --methods naive --json "$OUT/train_step_naive.json"
fi

if wants flow; then
    for family in "sd35m tiny_sd3 180" "flux tiny_flux 300"; do
        read -r full tiny limit <<< "$family"
        if ((GPU)); then
            stage "train-step benchmark, $full at full size (random weights), two-pass with the kernels, T = 10"
            timeout -k 10 "$limit" $PY benchmarks/train_step.py --unet "$full" --T 10 --methods triton --repeats 2 \
                --json "$OUT/train_step_$full.json"
        else
            stage "train-step rehearsal on the CPU: $tiny for $full, T = 2"
            timeout -k 10 120 $PY benchmarks/train_step.py --unet "$tiny" --T 2 --methods triton --repeats 1 \
                --json "$OUT/train_step_$full.json"
        fi
    done
fi
stage "done"
