"""What the final validation's consistency ELBO adds to a run's validation time (pipelines.train.validation).

At configs/demo.toml's settings (mnist5k, 250 test images, an untrained network of the demo's preset) and at
configs/train_tiny.toml's (the digits' test split, the 8×8 tiny network): one validation, then the ELBO of the
consistency subset, timed in turn in one process with one torch thread, three rounds. The share is the ELBO's
time against the run's validations (the number `validations_per_run` counts for the config).

Prints a table and writes benchmarks/results/consistency_cost.json.

    python benchmarks/consistency_cost.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import prepare_quick  # noqa: E402
from provenance import stamp  # noqa: E402 -- benchmarks/provenance.py: run as `python benchmarks/NAME.py`

from pipelines.common import config as cfg  # noqa: E402
from pipelines.data.readers import load_split, to_model_input  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.step import build_network, build_schedule  # noqa: E402
from pipelines.train.validation import Validator, validations_per_run  # noqa: E402
from pipelines.workflow.config import WorkflowConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "consistency_cost.json"


def measure(config: TrainConfig, dataset: Path, images: int, rounds: int) -> dict:
    x, _ = load_split(dataset, "test")
    x = torch.from_numpy(to_model_input(x[:images])).float()
    n = len(x)
    torch.manual_seed(0)
    model = build_network(config, x.shape[1], x.shape[2]).eval()
    validator = Validator(config, build_schedule(config), None, torch.device("cpu"), tuple(x.shape[1:]))
    validator.load(
        [
            {
                "x": x,
                "label": torch.zeros(n, dtype=torch.long),
                "index": torch.arange(n),
                "pad": torch.zeros(n, dtype=bool),
            }
        ]
    )
    validations = validations_per_run(config)
    shares, elbo = [], {}
    for _ in range(rounds):
        started = time.perf_counter()
        validator(model)
        one = time.perf_counter() - started
        started = time.perf_counter()
        elbo = validator._consistency(model, n)
        shares.append((time.perf_counter() - started) / (validations * one))
    return {
        "images": n,
        "validations_per_run": validations,
        "elbo_images": int(elbo["val/consistency_samples"]),
        "elbo_classes": int(elbo["val/consistency_elbo_classes"]),
        "share_of_validation_time": shares,
        "share_median": statistics.median(shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mnist, digits = Path(tmp, "mnist5k"), Path(tmp, "digits")
        prepare_quick("mnist5k", mnist, samples_per_shard=500)
        prepare_quick("digits", digits)
        demo = cfg.load(WorkflowConfig, ROOT / "configs" / "demo.toml", [f"train.data.uri={mnist}"]).train
        tiny = cfg.load(TrainConfig, ROOT / "configs" / "train_tiny.toml", [f"data.uri={digits}"])
        results = {
            "demo (mnist5k, 250 images)": measure(demo, mnist, 250, args.rounds),
            "train_tiny (digits, test split)": measure(tiny, digits, 10_000, args.rounds),
        }
    out = {
        "what": "the consistency ELBO's time against a run's validation time (one process, one torch thread)",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        **stamp(),
        "results": results,
    }
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'settings':34s} {'ELBO images × classes':>22s} {'share (median)':>15s}")
    for name, r in results.items():
        print(f"{name:34s} {r['elbo_images']:>10d} × {r['elbo_classes']:<9d} {r['share_median']:>15.1%}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
