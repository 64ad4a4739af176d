#!/usr/bin/env bash
# GPU training benchmark for a session that is lent a GPU; nothing else needs it.
#
# Measures, on one CUDA GPU, the training step of the paper's CIFAR-10 CDM
# (configs/cifar10.toml: cifar10 U-Net preset, T=1000, batch 128) through the
# real step code (pipelines.train.step.TrainStep: CDM loss with its double
# backward, gradient clipping, Adam, EMA):
#   - images/s with bf16 autocast (the headline), with fp32, and for the DDM
#     baseline in bf16 on the same U-Net, for comparison; torch's precision settings
#     are left as `cdm train` leaves them (no cudnn.benchmark, fp32 matmuls without
#     TF32, cuDNN's TF32 convolutions as torch's default has them), so the figures
#     are training's;
#   - model FLOP utilisation: FLOPs of one step counted by torch's FlopCounterMode
#     (forward, input-gradient backward and parameter backward) × steps/s, against
#     the datasheet's dense bf16 peak of the GPU it finds (989 TFLOP/s for H100/H200
#     SXM, 835 for the NVL cards, 756 for H100 PCIe, 312 for A100; none for others)
#     and against a bf16 8192³ matmul measured on the same GPU;
#   - peak GPU memory;
#   - peak GPU memory of the cifar10 preset's CDM step (eager, bf16 and fp32) per micro-batch size with
#     train.grad_accum: the recipe's global batch (BENCH_GLOBAL, 512) in micro-batches of each of BENCH_MICRO
#     ("64 128 256"), so a lent GPU answers which grad_accum fits it ("oom" where one does not);
#   - each of the four (CDM, DDM) x (bf16, fp32) eager and compiled (train.compile: torch.compile, the CDM's
#     input gradient through torch.func), the compilation's seconds reported apart from the step time
#     (BENCH_COMPILE=0 skips the compiled rows). FLOPs of a compiled step are its eager twin's: the same
#     arithmetic, which a dispatch-level counter cannot see inside a compiled graph.
# Sized to finish in under 8 minutes on an H100/H200, compilation included (~1-2 min per compiled graph). Needs torch (and numpy, typer,
# pyyaml) but not Ray or MLflow. Writes gpu_train.json into $OUT if set (the
# device tool's output folder), else into benchmarks/results/.
#
#   benchmarks/gpu.sh                    # on the GPU machine, from the repo root
#   BENCH_DEVICE=cpu BENCH_PRESET=tiny BENCH_BATCH=4 BENCH_STEPS=2 benchmarks/gpu.sh   # smoke test, no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && [ "${BENCH_DEVICE:-cuda}" = "cpu" ]; then PY=.venv/bin/python; fi
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DEST/gpu_train.json" <<'PYEOF'
import json, os, platform, sys, time

import torch

from pipelines.common import config as cfg
from pipelines.train.config import TrainConfig
from pipelines.train.step import fresh_train_step

out_path = sys.argv[1]
device = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
preset = os.environ.get("BENCH_PRESET", "cifar10")
batch = int(os.environ.get("BENCH_BATCH", "128"))
steps = int(os.environ.get("BENCH_STEPS", "25"))
warmup = int(os.environ.get("BENCH_WARMUP", "5" if device.type == "cuda" else "1"))


def datasheet_bf16_tflops(name):
    """Dense bf16 peak of the NVIDIA datasheet for the GPU called `name` (None if not known here)."""
    if "H100" in name or "H200" in name:
        return 756.0 if "PCIe" in name else 835.0 if "NVL" in name else 989.0
    return 312.0 if "A100" in name else None


if device.type == "cuda":
    assert torch.cuda.is_available(), "no CUDA GPU visible"
DEVICE_NAME = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
DATASHEET_BF16_TFLOPS = datasheet_bf16_tflops(DEVICE_NAME)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_tflops(n=8192, reps=10):
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def make_step(kind, precision, compiled=False):
    config = cfg.load(TrainConfig, "configs/cifar10.toml", [
        f"model.kind={kind}", f"model.preset={preset}", f"train.precision={precision}", f"train.batch_size={batch}",
        f"train.compile={'true' if compiled else 'false'}",
        # the classifier head's width is the CDM's; the DDM's head outputs the image
        *(["model.head_channels=none"] if kind == "ddm" else [])])
    channels, size = 3, 32
    step = fresh_train_step(config, channels, size, device)
    x = (torch.rand(batch, channels, size, size, device=device) * 2 - 1)
    return step, x, sum(p.numel() for p in step.model.parameters())


def flops_of_one_step(step, x):
    """FLOPs of one training step, from torch's per-op formulas (matmuls, convolutions, attention).

    A bare dispatch mode rather than FlopCounterMode: the latter's module tracker hooks
    the autograd graph and refuses torch.autograd.grad, which the CDM loss calls.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count():
        step(x)
    return Count.total


def bench(kind, precision, compiled=False, flops=None):
    step, x, params = make_step(kind, precision, compiled)
    compile_seconds = None
    if compiled:  # the first call compiles; the second, timed too, tells the compilation from a step
        sync()
        t = time.perf_counter()
        step(x)
        sync()
        first = time.perf_counter() - t
        t = time.perf_counter()
        step(x)
        sync()
        compile_seconds = round(first - (time.perf_counter() - t), 1)
    else:
        flops = flops_of_one_step(step, x)
    for _ in range(warmup):
        step(x)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        result = step(x)
    sync()
    seconds = (time.perf_counter() - t) / steps
    assert result.finite, f"{kind} {precision}: non-finite loss"
    row = {
        "params": params,
        "step_ms": round(seconds * 1e3, 2),
        "images_per_s": round(batch / seconds, 1),
        "tflop_per_step": round(flops / 1e12, 4),
        "achieved_tflops": round(flops / seconds / 1e12, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "compile_seconds": compile_seconds,
    }
    del step, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def micro_batch_memory(precision, micro, total):
    """Peak GPU memory (GiB) of one CDM step of `total` images in micro-batches of `micro`; "oom" if it does not fit."""
    config = cfg.load(TrainConfig, "configs/cifar10.toml", [
        f"model.preset={preset}", f"train.precision={precision}", f"train.batch_size={total}",
        f"train.grad_accum={total // micro}"])
    step = x = None
    try:
        step = fresh_train_step(config, 3, 32, device)
        x = torch.rand(total, 3, 32, 32, device=device) * 2 - 1
        step(x)  # the first step allocates Adam's moments, which every later one keeps
        sync()
        if device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        assert step(x).finite, f"micro-batch {micro}, {precision}: non-finite loss"
        sync()
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.OutOfMemoryError:
        return "oom"
    finally:
        del step, x
        if device.type == "cuda":
            torch.cuda.empty_cache()


matmul = measured_matmul_tflops()
total = int(os.environ.get("BENCH_GLOBAL", "512"))
micro_memory = {
    f"cdm_{precision}_micro{micro}_peak_memory_gib": micro_batch_memory(precision, micro, total)
    for precision in ("bf16", "fp32")
    for micro in (int(m) for m in os.environ.get("BENCH_MICRO", "64 128 256").split())
}
rows = {}
for kind in ("cdm", "ddm"):
    for precision in ("bf16", "fp32"):
        rows[f"{kind}_{precision}"] = bench(kind, precision)
        if os.environ.get("BENCH_COMPILE", "1") == "1":
            eager_flops = rows[f"{kind}_{precision}"]["tflop_per_step"] * 1e12
            rows[f"{kind}_{precision}_compiled"] = bench(kind, precision, True, eager_flops)
results = {
    "device": DEVICE_NAME,
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "model": f"{preset} U-Net preset, 32x32x3, T=1000 (configs/cifar10.toml)",
    "batch": batch,
    "timed_steps": steps,
    "measured_bf16_matmul_tflops": round(matmul, 1) if matmul else None,
    "datasheet_bf16_tflops": DATASHEET_BF16_TFLOPS,
    "micro_batch_global_batch": total,
    **micro_memory,
}
for name, row in rows.items():
    for key, value in row.items():
        results[f"{name}_{key}"] = value
    results[f"{name}_mfu_vs_datasheet"] = (
        round(row["achieved_tflops"] / DATASHEET_BF16_TFLOPS, 4) if DATASHEET_BF16_TFLOPS else None
    )
    if matmul:
        results[f"{name}_mfu_vs_measured_matmul"] = round(row["achieved_tflops"] / matmul, 4)
results["cdm_vs_ddm_step_time_bf16"] = round(rows["cdm_bf16"]["step_ms"] / rows["ddm_bf16"]["step_ms"], 2)
for name in [n for n in rows if n.endswith("_compiled")]:
    results[f"{name}_speedup"] = round(rows[name[: -len("_compiled")]]["step_ms"] / rows[name]["step_ms"], 3)

print(f"\n{results['device']}, {results['model']}, batch {batch}")
print(f"{'':18} {'images/s':>9} {'ms/step':>8} {'TFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6} {'compile s':>9} {'speed-up':>8}")
for name, row in rows.items():
    mfu = results[name + "_mfu_vs_datasheet"]
    print(f"{name:18} {row['images_per_s']:>9} {row['step_ms']:>8} {row['tflop_per_step']:>11} {row['achieved_tflops']:>8} "
          f"{format(mfu, '.1%') if mfu is not None else '-':>6} {row['peak_memory_gib']!s:>6} "
          f"{row['compile_seconds'] if row['compile_seconds'] is not None else '-':>9} "
          f"{results.get(name + '_speedup', '-'):>8}")
print(f"peak memory of a CDM step of {total} images per micro-batch size: {micro_memory}")
print(f"MFU against the datasheet's {DATASHEET_BF16_TFLOPS} TFLOP/s dense bf16; measured bf16 matmul: {results['measured_bf16_matmul_tflops']} TFLOP/s")
with open(out_path, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
print(f"wrote {out_path}")
PYEOF
