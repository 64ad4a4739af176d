"""Evaluation benchmark: what the batch stages cost on this machine.

1. The NLL stage end to end (Ray Data reading shards, one forward pass per image
   on an actor, Parquet written) against the bare forward pass of the same
   model and batch in one process with one thread — the stage's efficiency
   per core (`nll_stage_vs_forward_ratio`, target ≥ 0.8).
2. CDM vs DDM sampling cost per image at equal steps, same backbone (the CDM
   pays a forward and a backward pass per step).
3. Feature extraction images/s: the `train-features` classifier, torch-fidelity's
   Inception-v3 (randomly initialised: a speed figure only, no FID is computed),
   and the FID stage end to end.
4. Likelihood cost side by side (the paper's Table 3): one-pass vs ELBO vs ODE on
   the same model and images, through the NLL workers' own code (`LikelihoodScorer`,
   one thread, one batch): images/s, NFE per sample and bits/dim of each. By default
   the benchmark's untrained CDM on mnist5k (speed only: its bits/dim mean nothing);
   `--likelihood-checkpoint CKPT --likelihood-data DATASET` measures a trained model.

Prints a table and writes benchmarks/results/eval.json (a flat object); `--only likelihood`
runs part 4 alone and updates its keys in the existing file.

    python benchmarks/eval.py [--preset tiny] [--batch 100] [--workdir /tmp/cdm-eval-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from provenance import stamp  # benchmarks/provenance.py: run as `python benchmarks/NAME.py`

RESULTS = Path(__file__).parent / "results" / "eval.json"
T = 1000


def config_for(kind: str) -> dict:
    return {
        "model": {"kind": kind},
        "schedule": {"name": "linear", "T": T},
        "loss": {"prior": None},
        "data": {"num_labels": None},
    }


def bare_forward_images_per_s(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    """The same model and batch, one process, one thread, no data loading: the ceiling for one worker."""
    torch.set_num_threads(1)
    with torch.no_grad():
        model(x)  # warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def time_call(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def likelihood_costs(checkpoint: Path, data: Path, n: int, elbo_stride: int, rtol: float) -> dict:
    """One-pass, ELBO and ODE on the same n test images of `data`, one thread, the NLL workers' own code path."""
    from pipelines.data import shards as sh
    from pipelines.data.readers import LocalReader
    from pipelines.evaluate.nll import LikelihoodScorer, Methods, bpd_offset

    ds = sh.open_dataset(data)
    split = "test" if ds.count("test") else "train"
    reader = LocalReader(data, split)
    index = np.arange(min(n, len(reader)))
    batch = {
        "x": reader.inputs(index),
        "index": index,
        "label": np.zeros(len(index), np.int64),
        "pad": np.zeros(len(index), bool),
    }
    out: dict = {"likelihood_images": len(index), "likelihood_checkpoint": str(checkpoint)}
    for method in ("one-pass", "elbo", "ode"):
        scorer = LikelihoodScorer(
            str(checkpoint),
            True,
            "cpu",
            1,
            dequantize=False,
            seed=0,
            offset=bpd_offset("standard"),
            conditional=False,
            methods=Methods((method,), elbo_stride, rtol, rtol, "hutchinson"),
        )
        scorer(batch)  # warm-up (and the one-pass figure's repeat)
        start = time.perf_counter()
        scored = scorer(batch)
        seconds = time.perf_counter() - start
        key = method.replace("-", "_")
        bpd = {"one-pass": "bpd", "elbo": "bpd_elbo", "ode": "bpd_ode"}[method]
        nfe = 1.0 if method == "one-pass" else float(scored[f"nfe_{key}"].mean())
        out |= {
            f"likelihood_{key}_nfe_per_sample": nfe,
            f"likelihood_{key}_images_per_s_1thread": round(len(index) / seconds, 3),
            f"likelihood_{key}_bpd": round(float(scored[bpd].mean()), 4),
        }
        if method == "one-pass":
            out["likelihood_T"] = scorer.trained.schedule.T
            out["likelihood_schedule"] = scorer.trained.config["schedule"]["name"]
    out |= {
        "likelihood_elbo_stride": elbo_stride,
        "likelihood_ode_rtol_atol": rtol,
        "likelihood_ode_trace": "hutchinson",
    }
    out["likelihood_bpd_convention"] = "standard (ELBO: discrete, comparable)"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="U-Net preset for the NLL and sampling measurements.")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--sample-n", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=["likelihood"], default=None, help="Run part 4 alone; update its keys.")
    parser.add_argument("--likelihood-checkpoint", type=Path, default=None)
    parser.add_argument("--likelihood-data", type=Path, default=None)
    parser.add_argument("--likelihood-n", type=int, default=16, help="Images scored by each method.")
    parser.add_argument("--elbo-stride", type=int, default=10, help="ELBO classes kept: every N-th (NFE = T/N).")
    parser.add_argument("--ode-tol", type=float, default=1e-5, help="The ODE's rtol = atol.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only == "likelihood":
        if not (args.likelihood_checkpoint and args.likelihood_data):
            parser.error("--only likelihood needs --likelihood-checkpoint and --likelihood-data")
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result = {k: v for k, v in result.items() if not k.startswith("likelihood_")}
        result |= likelihood_costs(
            args.likelihood_checkpoint, args.likelihood_data, args.likelihood_n, args.elbo_stride, args.ode_tol
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for key, value in result.items():
            if key.startswith("likelihood_"):
                print(f"  {key:<44}  {value}")
        print(f"wrote {args.out}")
        return

    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from cdm_core.checkpoint import save_checkpoint
    from cdm_core.networks import UNetClassifier, UNetDenoiser, unet_preset
    from pipelines.common.checkpoints import load_trained_model
    from pipelines.common.config import nest
    from pipelines.common.storage import sha256_file
    from pipelines.data.config import PrepareConfig
    from pipelines.data.prepare import run as prepare
    from pipelines.data.readers import LocalReader
    from pipelines.evaluate.config import FidConfig, NllConfig, TrainFeaturesConfig
    from pipelines.evaluate.feature_classifier import train_features
    from pipelines.evaluate.features import ClassifierFeatures, InceptionFeatures
    from pipelines.evaluate.fid import run as run_fid
    from pipelines.evaluate.nll import run as run_nll
    from pipelines.evaluate.sample import generate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cdm-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "mnist5k"
    prepare(nest(PrepareConfig, source="mnist5k", out=str(data), track=False))
    reader = LocalReader(data, "train")
    n_images = len(reader)

    torch.manual_seed(0)
    cfg = unet_preset(args.preset, in_channels=1, image_size=28)
    cdm, ddm = UNetClassifier(cfg, T).eval(), UNetDenoiser(cfg, T).eval()
    save_checkpoint(work / "cdm" / "checkpoint.pt", model=cdm, step=0, config=config_for("cdm"))
    save_checkpoint(work / "ddm" / "checkpoint.pt", model=ddm, step=0, config=config_for("ddm"))
    x = torch.from_numpy(reader.inputs(np.arange(args.batch)))
    result: dict = {
        "machine": platform.processor() or platform.machine(),
        **stamp(),
        "cpu_cores": os.cpu_count(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "preset": args.preset,
        "image": "28x28x1",
        "T": T,
        "batch": args.batch,
    }

    # 1. NLL stage vs the bare forward pass, interleaved so machine noise hits both.
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False

    def stage_seconds(workers: int) -> float:
        """The whole `cdm nll` stage call: model check, manifest, Ray Data read + actor start-up + scoring, Parquet."""
        start = time.perf_counter()
        run_nll(
            nest(
                NllConfig,
                checkpoint=str(work / "cdm"),
                dataset=str(data),
                split="train",
                workers=workers,
                batch_size=args.batch,
                out=str(work / f"nll{workers}"),
                track=False,
            )
        )
        return time.perf_counter() - start

    forward_before = bare_forward_images_per_s(cdm, x, reps=5)
    stage1 = stage_seconds(1)
    forward_after = bare_forward_images_per_s(cdm, x, reps=5)
    forward = (forward_before + forward_after) / 2
    result.update(
        {
            "nll_images": n_images,
            "bare_forward_images_per_s_1thread": round(forward, 1),
            "nll_stage_images_per_s_1worker": round(n_images / stage1, 1),
            "nll_stage_seconds_1worker": round(stage1, 2),
            "nll_stage_vs_forward_ratio": round(n_images / stage1 / forward, 3),
            "nll_stage_target_ratio": 0.8,
        }
    )
    result["nll_stage_meets_target"] = result["nll_stage_vs_forward_ratio"] >= 0.8

    # 2. CDM vs DDM sampling per image, equal steps, the workers' own code path (`generate`), one thread.
    torch.set_num_threads(1)
    indices = range(args.sample_n)
    for kind in ("cdm", "ddm"):
        trained = load_trained_model(work / kind)
        seconds = time_call(
            lambda trained=trained: generate(trained, indices, sampler="ddim", steps=args.sample_steps, seed=0), reps=2
        )
        result[f"sample_{kind}_s_per_image_{args.sample_steps}steps"] = round(seconds / args.sample_n, 4)
    result["sample_cdm_vs_ddm_cost_ratio"] = round(
        result[f"sample_cdm_s_per_image_{args.sample_steps}steps"]
        / result[f"sample_ddm_s_per_image_{args.sample_steps}steps"],
        2,
    )

    # 3. Feature extraction.
    clf = train_features(nest(TrainFeaturesConfig, dataset=str(data), out=str(work / "clf"), epochs=1, track=False))
    images = reader.data[:500]
    extractor = ClassifierFeatures(clf.path)
    result["features_classifier_images_per_s_1thread"] = round(500 / time_call(lambda: extractor(images), reps=3), 1)
    from pipelines.evaluate.features import _import_inception_extractor

    inception_cls = _import_inception_extractor()

    class Unloaded(inception_cls):
        def load_state_dict(self, *a, **k):
            return None

    torch.save({}, work / "empty.pt")
    torch.save(
        Unloaded("random", ["2048"], feature_extractor_weights_path=str(work / "empty.pt")).state_dict(),
        work / "random-inception.pth",
    )
    inception = InceptionFeatures(str(work / "random-inception.pth"), sha256_file(work / "random-inception.pth"))
    few = images[:16]
    result["features_inception_images_per_s_1thread"] = round(16 / time_call(lambda: inception(few), reps=2), 2)
    fid = run_fid(
        nest(
            FidConfig,
            samples=str(data),
            samples_split="test",
            reference=str(data),
            reference_split="train",
            features=f"classifier:{clf.path}",
            cache_dir=str(work / "cache"),
            workers=os.cpu_count(),
            batch_size=args.batch,
            track=False,
        )
    )
    result[f"fid_stage_classifier_images_per_s_{os.cpu_count()}workers"] = round(fid.images_per_s, 1)
    ray.shutdown()

    # 4. Likelihood cost side by side: one-pass vs ELBO vs ODE, the same model and images.
    result |= likelihood_costs(
        args.likelihood_checkpoint or work / "cdm",
        args.likelihood_data or data,
        args.likelihood_n,
        args.elbo_stride,
        args.ode_tol,
    )
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    print(f"eval benchmark ({args.preset} preset, 28x28x1, batch {args.batch}, CPU):")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")
    print(f"wrote {args.out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
