"""Core benchmark: what a CDM costs next to a DDM on the same backbone, on this machine.

One run, one process for the timings (interleaved repetitions, so machine noise
hits both sides alike), one fresh subprocess per measured operation for peak
memory. Prints a table and writes benchmarks/results/core.json (a flat object).

    python benchmarks/core.py [--preset mnist] [--batch 16] [--reps 5]

It also times the real training step (`pipelines.train.step.TrainStep`: loss, backward, Adam,
EMA) eager and compiled (`train.compile`), CDM and DDM, in a fresh process for one torch thread
and for two; a compiled step's first call compiles, and its seconds are reported apart.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

from cdm_core.ddm import ddm_loss
from cdm_core.networks import UNetClassifier, UNetDenoiser, count_parameters, unet_preset
from cdm_core.objective import cdm_loss, log_likelihood
from cdm_core.samplers import cdm_eps_fn, ddim_sample, ddm_eps_fn
from cdm_core.schedules import get_schedule

RESULTS = Path(__file__).parent / "results" / "core.json"
T = 1000


def build(preset: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = unet_preset(preset, in_channels=1, image_size=28)
    cdm, ddm = UNetClassifier(cfg, T), UNetDenoiser(cfg, T)
    schedule = get_schedule("linear", T).to(dtype=torch.float32)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    return cdm, ddm, schedule, x


def operations(cdm, ddm, schedule, x):
    """Each measured operation as a zero-argument callable."""
    cdm_opt = torch.optim.Adam(cdm.parameters(), lr=1e-4)
    ddm_opt = torch.optim.Adam(ddm.parameters(), lr=1e-4)

    def cdm_train_step():
        loss = cdm_loss(cdm, x, schedule).total
        cdm_opt.zero_grad(set_to_none=True)
        loss.backward()
        cdm_opt.step()

    def ddm_train_step():
        loss = ddm_loss(ddm, x, schedule)
        ddm_opt.zero_grad(set_to_none=True)
        loss.backward()
        ddm_opt.step()

    cl_model = copy.deepcopy(cdm).to(memory_format=torch.channels_last)
    cl_x = x.contiguous(memory_format=torch.channels_last)
    cl_opt = torch.optim.Adam(cl_model.parameters(), lr=1e-4)

    def cdm_train_step_channels_last():
        loss = cdm_loss(cl_model, cl_x, schedule).total
        cl_opt.zero_grad(set_to_none=True)
        loss.backward()
        cl_opt.step()

    def cdm_train_step_bf16_autocast():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = cdm_loss(cdm, x, schedule).total
        cdm_opt.zero_grad(set_to_none=True)
        loss.backward()
        cdm_opt.step()

    def cdm_nll():
        log_likelihood(cdm, x, schedule)

    @torch.no_grad()
    def bare_forward():
        cdm(x)

    def cdm_sample_step():
        ddim_sample(cdm_eps_fn(cdm, schedule), x, schedule, 1)

    def ddm_sample_step():
        ddim_sample(ddm_eps_fn(ddm), x, schedule, 1)

    return {
        "cdm_train_step": cdm_train_step,
        "ddm_train_step": ddm_train_step,
        "cdm_nll": cdm_nll,
        "bare_forward": bare_forward,
        "cdm_sample_step": cdm_sample_step,
        "ddm_sample_step": ddm_sample_step,
        "cdm_train_step_channels_last": cdm_train_step_channels_last,
        "cdm_train_step_bf16_autocast": cdm_train_step_bf16_autocast,
    }


def time_interleaved(ops: dict, reps: int) -> dict[str, float]:
    """Median seconds per call; one warm-up each, then round-robin repetitions."""
    for fn in ops.values():
        fn()
    samples = {name: [] for name in ops}
    for _ in range(reps):
        for name, fn in ops.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(vals) for name, vals in samples.items()}


def _vm_hwm_mib() -> float:
    """This process's peak resident set size (VmHWM). Unlike ru_maxrss it is reset by exec,
    so a child does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_memory_mib(preset: str, batch: int, op: str) -> float:
    """Peak RSS growth of a fresh process running one operation twice, over its state after set-up."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import core; torch.set_num_threads(1);"  # noqa: UP031
        "cdm, ddm, s, x = core.build(%r, %d); ops = core.operations(cdm, ddm, s, x);"
        "base = core._vm_hwm_mib(); ops[%r](); ops[%r](); print(core._vm_hwm_mib() - base)"
    ) % (str(Path(__file__).resolve().parent), preset, batch, op, op)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def torch_compile_double_backward() -> str:
    """Does torch.compile accept the CDM loss (a double backward)? Answer in words, measured here."""
    cdm, _, schedule, x = build("tiny", 4)
    compiled = torch.compile(cdm)
    try:
        cdm_loss(compiled, x, schedule).total.backward()
        return "works"
    except Exception as err:  # the failure is the finding
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def train_steps(preset: str, batch: int) -> dict:
    """Eager and compiled TrainSteps of a CDM and a DDM (configs/mnist.toml with `preset`), each with its batch."""
    from pipelines.common import config as cfg
    from pipelines.train.config import TrainConfig
    from pipelines.train.step import fresh_train_step

    steps = {}
    for kind in ("cdm", "ddm"):
        for compiled in (False, True):
            config = cfg.load(
                TrainConfig,
                Path(__file__).resolve().parents[1] / "configs" / "mnist.toml",
                [
                    "data.uri=unused",
                    f"model.preset={preset}",
                    f"model.kind={kind}",
                    f"train.compile={compiled}".lower(),
                ],
            )
            steps[f"{kind}_train_step{'_compiled' if compiled else ''}"] = fresh_train_step(config, 1, 28)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {name: (lambda step=step: step(x)) for name, step in steps.items()}


def compiled_part(preset: str, batch: int, reps: int) -> dict:
    """Compilation seconds and interleaved step times of eager and compiled steps, in this process."""
    ops = train_steps(preset, batch)
    compile_seconds = {}
    for name in [n for n in ops if n.endswith("_compiled")]:
        start = time.perf_counter()
        ops[name]()
        first = time.perf_counter() - start
        start = time.perf_counter()
        ops[name]()
        compile_seconds[name] = first - (time.perf_counter() - start)
    secs = time_interleaved(ops, reps)
    out = {f"{name}_seconds": v for name, v in secs.items()}
    out.update({f"{name}_compile_seconds": v for name, v in compile_seconds.items()})
    for kind in ("cdm", "ddm"):
        out[f"{kind}_compiled_speedup"] = secs[f"{kind}_train_step"] / secs[f"{kind}_train_step_compiled"]
    out["cdm_vs_ddm_step_ratio_compiled"] = secs["cdm_train_step_compiled"] / secs["ddm_train_step_compiled"]
    return out


def compiled_in_fresh_process(preset: str, batch: int, reps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--compiled-part", "--preset", preset, "--batch", str(batch)]
    cmd += ["--reps", str(reps), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 keeps ratios stable on a shared 2-core machine"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--compiled-part", action="store_true", help=argparse.SUPPRESS)  # one fresh process's part
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compiled_part:
        print(json.dumps(compiled_part(args.preset, args.batch, args.reps)))
        return

    load_at_start = os.getloadavg()[0]
    cdm, ddm, schedule, x = build(args.preset, args.batch)
    ops = operations(cdm, ddm, schedule, x)
    memory = {op: peak_memory_mib(args.preset, args.batch, op) for op in ops}
    secs = time_interleaved(ops, args.reps)
    compile_status = torch_compile_double_backward()
    compiled = {n: compiled_in_fresh_process(args.preset, args.batch, args.reps, n) for n in (1, 2)}

    b = args.batch
    result = {
        "preset": args.preset,
        "image_shape": "1x28x28",
        "batch": b,
        "T": T,
        "reps": args.reps,
        "cdm_params": count_parameters(cdm),
        "ddm_params": count_parameters(ddm),
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        **stamp(),
        "load_average_1min_at_start": load_at_start,
        **{f"{op}_seconds": v for op, v in secs.items()},
        **{f"{op}_peak_rss_mib": v for op, v in memory.items()},
        "cdm_train_images_per_s": b / secs["cdm_train_step"],
        "ddm_train_images_per_s": b / secs["ddm_train_step"],
        "cdm_nll_images_per_s": b / secs["cdm_nll"],
        "bare_forward_images_per_s": b / secs["bare_forward"],
        "cdm_vs_ddm_step_ratio": secs["cdm_train_step"] / secs["ddm_train_step"],
        "nll_vs_forward_ratio": secs["bare_forward"] / secs["cdm_nll"],
        "cdm_vs_ddm_sample_step_ratio": secs["cdm_sample_step"] / secs["ddm_sample_step"],
        "cdm_vs_ddm_train_memory_ratio": memory["cdm_train_step"] / max(memory["ddm_train_step"], 1.0),
        "channels_last_speedup_cpu": secs["cdm_train_step"] / secs["cdm_train_step_channels_last"],
        "bf16_autocast_speedup_cpu": secs["cdm_train_step"] / secs["cdm_train_step_bf16_autocast"],
        "torch_compile_double_backward": compile_status,
        **{f"threads{n}_{key}": value for n, part in compiled.items() for key, value in part.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"cdm_core benchmark: {args.preset} preset, batch {b}, 1x28x28, T={T}, CPU, {result['threads']} threads")
    print(f"{'operation':<30} {'ms/call':>10} {'images/s':>10} {'peak RSS MiB':>13}")
    for op, s in secs.items():
        print(f"{op:<30} {1000 * s:>10.1f} {b / s:>10.1f} {memory[op]:>13.0f}")
    print()
    print(f"CDM / DDM training step time      : {result['cdm_vs_ddm_step_ratio']:.2f}x  (target <= 2.5x)")
    print(f"CDM NLL / bare forward throughput : {result['nll_vs_forward_ratio']:.2f}x  (target >= 0.9x)")
    print(f"CDM / DDM sampling step time      : {result['cdm_vs_ddm_sample_step_ratio']:.2f}x")
    print(f"CDM / DDM training peak memory    : {result['cdm_vs_ddm_train_memory_ratio']:.2f}x")
    print(f"channels_last CDM step speed-up   : {result['channels_last_speedup_cpu']:.2f}x (CPU)")
    print(f"bf16 autocast CDM step speed-up   : {result['bf16_autocast_speedup_cpu']:.2f}x (CPU)")
    print(f"torch.compile with double backward: {compile_status}")
    print()
    print("the training step (TrainStep: loss, backward, Adam, EMA), eager and compiled (train.compile)")
    print(f"{'threads':<8} {'step':<10} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9} {'compile s':>10}")
    for n, part in compiled.items():
        for kind in ("cdm", "ddm"):
            eager, comp = part[f"{kind}_train_step_seconds"], part[f"{kind}_train_step_compiled_seconds"]
            print(
                f"{n:<8} {kind:<10} {1000 * eager:>9.1f} {1000 * comp:>12.1f} {eager / comp:>8.2f}x "
                f"{part[f'{kind}_train_step_compiled_compile_seconds']:>10.0f}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
