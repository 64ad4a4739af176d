#!/usr/bin/env bash
# The first GPU run, end to end, on one GPU in under 8 minutes: what no CPU test can show.
#
#   1. a CIFAR-10-shaped dataset (the official python layout with random pixels: no download),
#      2,000 training and 500 test images, through `cdm prepare cifar10`;
#   2. `cdm train` of the paper's cifar10 U-Net preset in bf16 with scaling.use_gpu=true:
#      200 steps across log steps (every 50), validations and checkpoints (every 100), with the
#      worker killed once at step 150 (fault injection; run.max_failures=1 restarts it from the
#      step-100 checkpoint), then `cdm train --resume` to 300 steps;
#   3. `cdm nll` of the test split and a short `cdm sample` (64 images, the paper's DPM-Solver-2, 25 steps) on GPU actors
#      (--gpus-per-worker 1);
#   4. one JSON of what ran and its figures: $OUT/gpu_pipeline.json if OUT is set, else
#      benchmarks/results/gpu_pipeline.json.
#
# Needs cdm installed with a CUDA torch (`make install TORCH_SPEC=` after installing your torch) and
# a GPU; PYTHON names the interpreter (default .venv/bin/python, else python3). Ray and MLflow come with
# cdm: a machine without them (this workplace's lent GPU machines have torch only, and Ray's wheel alone
# is larger than what a call may carry there) cannot run it.
#
#   benchmarks/gpu_pipeline.sh
#   GPU_PIPELINE_DEVICE=cpu GPU_PIPELINE_PRESET=tiny GPU_PIPELINE_BATCH=16 GPU_PIPELINE_STEPS=12 benchmarks/gpu_pipeline.sh
#                                      # the same path on a CPU, small, as a smoke test of the script
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi; fi
DEST="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$DEST"
WORK="$(mktemp -d -t cdm-gpu-pipeline-XXXXXX)"
STEPS="${GPU_PIPELINE_STEPS:-300}"          # after the resume; the first run trains 2/3 of them
DEVICE="${GPU_PIPELINE_DEVICE:-cuda}"       # cpu: a smoke test of this script without a GPU
PRESET="${GPU_PIPELINE_PRESET:-cifar10}"
BATCH="${GPU_PIPELINE_BATCH:-128}"
export PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" CDM_TUNE_VERBOSE=0
cdm() { "$PY" -m pipelines.cli "$@"; }
if [ "$DEVICE" = cuda ]; then GPU=(--set scaling.use_gpu=true); POOL=(--gpus-per-worker 1); PREC=bf16; else GPU=(); POOL=(); PREC=fp32; fi
FIRST=$(( STEPS * 2 / 3 )); EVERY=$(( STEPS / 3 )); KILL=$(( FIRST * 3 / 4 ))
SECONDS=0
stamp() { echo "$1 $SECONDS" >> "$WORK/times"; echo "== $1 at ${SECONDS}s"; }

stamp start
"$PY" - "$WORK/src" <<'PYEOF'
import pickle, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1]) / "cifar-10-batches-py"
root.mkdir(parents=True)
rng = np.random.default_rng(0)
names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
for name in names:
    n = 500 if name == "test_batch" else 400
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist(),
             b"filenames": [f"{name}_{i}.png".encode() for i in range(n)], b"batch_label": name.encode()}
    (root / name).write_bytes(pickle.dumps(batch, protocol=2))
meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": 400, b"num_vis": 3072}
(root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
PYEOF
cdm prepare cifar10 --path "$WORK/src/cifar-10-batches-py" --out "$WORK/data" --no-track
stamp prepared

TRAIN=(configs/cifar10.toml --set "data.uri=$WORK/data" --set "run.storage_path=$WORK/runs" --set run.name=gpu
       --set "model.preset=$PRESET" --set "train.batch_size=$BATCH" --set "train.steps=$FIRST" --set train.precision=$PREC --set train.log_every=$(( EVERY / 2 > 0 ? EVERY / 2 : 1 ))
       --set "checkpoint.every=$EVERY" --set "validation.every=$EVERY" --set validation.max_samples=500
       --set sampling.every=0 --set run.log_model=false --set run.max_failures=1 --set optim.warmup_steps=10
       --set scaling.cpus_per_worker=2 "${GPU[@]}")
CDM_FAIL_AT_STEP=$KILL CDM_FAIL_MARKER="$WORK/killed-once" cdm train "${TRAIN[@]}" | tee "$WORK/train1.log"
stamp trained
cdm train --resume "$WORK/runs/gpu" --set "train.steps=$STEPS" | tee "$WORK/train2.log"
stamp resumed
CKPT="$(ls -d "$WORK"/runs/gpu/checkpoint_0* | sort | tail -1)"
cdm nll "$CKPT" "$WORK/data" --split test --out "$WORK/nll" --no-track "${POOL[@]}" | tee "$WORK/nll.log"
stamp scored
cdm sample "$CKPT" --n 64 --sampler dpmsolver2m --steps 25 --time-grid official --clip-x0 0 --out "$WORK/samples" --no-track "${POOL[@]}" | tee "$WORK/sample.log"
stamp sampled

"$PY" - "$WORK" "$DEST/gpu_pipeline.json" "$DEVICE" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from mlflow.tracking import MlflowClient

work, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
times = dict(line.split() for line in (work / "times").read_text().splitlines())
client = MlflowClient()
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=10)
train = next(r for r in runs if r.data.tags.get("cdm.stage") == "train")
history = {k: [(m.step, m.value) for m in client.get_metric_history(train.info.run_id, k)]
           for k in ("train/loss", "train/images_per_s", "val/nll_bpd", "val/mse")}
nll = json.loads((work / "nll" / "summary.json").read_text())
sample_meta = json.loads((work / "samples" / "dataset.json").read_text())
restarts = {k: v for k, v in train.data.tags.items() if k.startswith("cdm.restarted_from_step.")}
result = {
    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "what_ran": "prepare (random-pixel CIFAR-10 layout, 2000/500) -> cdm train cifar10 preset "
                f"{train.data.params.get('train.precision')}, use_gpu={train.data.params.get('scaling.use_gpu')}, "
                f"{train.data.params.get('model.preset')} preset, batch {train.data.params.get('train.batch_size')}, "
                "worker killed once and restarted from a checkpoint, then --resume -> cdm nll and cdm sample on "
                + ("GPU" if device == "cuda" else "CPU") + " actors",
    "final_step": int(train.data.tags.get("cdm.final_step", 0)),
    "restarts": restarts,
    "world_size": train.data.tags.get("cdm.world_size"),
    "train_loss_first_last": [history["train/loss"][0], history["train/loss"][-1]] if history["train/loss"] else None,
    "train_images_per_s_last": history["train/images_per_s"][-1][1] if history["train/images_per_s"] else None,
    "val_nll_bpd": history["val/nll_bpd"], "val_mse": history["val/mse"],
    "test_nll_bpd": nll["nll_bpd"], "test_nll_count": nll["count"], "nll_images_per_s": nll["images_per_s"],
    "nll_allow_tf32": nll.get("allow_tf32"),
    "samples": sample_meta["counts"], "seconds": {k: int(v) for k, v in times.items()},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
print(f"wrote {out}")
PYEOF
[ -n "${GPU_PIPELINE_KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
