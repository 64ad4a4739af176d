"""When is a CDM's one-pass NLL its density? One pass, ELBO and ODE of the same models, over seeds (issue 30).

Rows: the paper's recipe (8-bit inputs, no dequantization), the same with dequantized training (x + u·2/255),
the paper's recipe trained twice as long, and w_ce = 1e-2 instead of 1e-3; each `studies/miniature.toml`
(sklearn's 8×8 digits, `tiny` U-Net, linear T = 100) with the same steps and batch (the longer row: ×2), for
every seed (`train.train.seed`, `sample.seed`). Columns, per model: the one-pass NLL of the 179 test digits
(`cdm run`'s nll stage), the DDPM ELBO over all T classes (`cdm nll --method one-pass,elbo`), the
probability-flow ODE on the first 48 test digits (`cdm_core.likelihood.ode_log_likelihood`, the
function `cdm nll --method ode` runs, in this process: `cdm nll` has no subset), one-pass − ELBO, the mean
ℓ₀ − ℓ₁ beside its 8-bit scale, FD of 500 DDIM-50 samples. The figure: log p₀ split class by class
(`decomposition.py`), the one-pass increments ℓ_t − ℓ_{t+1} beside those the model's ε̂ implies at the
same test digits.

    python studies/consistency/run.py [--seeds 0,1] [--smoke]     (~16 min per seed on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cdm_core.likelihood import cdm_continuous_eps_fn, ode_log_likelihood
from cdm_core.objective import log_likelihood_from_logits, nats_to_bits_per_dim
from pipelines.common.checkpoints import load_trained_model
from pipelines.data.readers import load_split, to_model_input
from pipelines.evaluate.nll import PROBE_TAG, dequantization_noise, sample_generators

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Study, fd_metric, markdown_table, score_test_split, spread  # noqa: E402
from decomposition import implied_increments, log_normal, one_pass_increments  # noqa: E402

HERE = Path(__file__).resolve().parent
STEPS = 600  # every row's training budget (64 images a step); the longer row trains LONGER × as many
LONGER = 2
DEQUANTIZED = ["train.data.dequantize=true", "train.validation.dequantize=true", "nll.dequantize=true"]
ROWS = {
    "paper": [],
    "dequantized": DEQUANTIZED,
    "longer": [
        f"train.train.steps={LONGER * STEPS}",
        f"train.validation.every={LONGER * STEPS}",
        f"train.checkpoint.every={LONGER * STEPS}",
    ],
    "w_ce_1e-2": ["train.loss.w_ce=0.01"],
}
LABELS = {
    "paper": f"paper recipe ({STEPS} steps, 8-bit inputs)",
    "dequantized": f"dequantized training ({STEPS} steps)",
    "longer": f"paper recipe, {LONGER * STEPS} steps",
    "w_ce_1e-2": f"w_ce = 1e-2 ({STEPS} steps)",
}
# Every run of the study: its budget, and no Ray actors (training in Ray Train's local mode, batch stages in
# the `cdm run` process), so the study shares the machine's two cores with nothing of its own.
BASE = [
    f"train.train.steps={STEPS}",
    f"train.validation.every={STEPS}",
    f"train.checkpoint.every={STEPS}",
    "train.scaling.num_workers=0",
    "sample.workers=0",
    "nll.workers=0",
    "fid.workers=0",
]
# --smoke: the rows with settings of their own (dequantization's three; the others differ by numbers the
# paper row already passes), and every evaluation's code path at a few digits, a short ELBO chain and a loose ODE.
SMOKE_ROWS = ("paper", "dequantized")
SMOKE_SIZES = {
    "digits": 4,
    "decomposition_digits": 4,
    "ode_digits": 1,
    "ode_tol": 1e-1,
    "elbo_stride": 25,
    "nodes": 1,
    "probes": 1,
}
FULL_SIZES = {
    "digits": None,
    "decomposition_digits": 16,
    "ode_digits": 8,
    "ode_tol": 1e-4,
    "elbo_stride": 1,
    "nodes": 2,
    "probes": 1,
}


def bits(nats: float | np.ndarray, dims: int) -> float | np.ndarray:
    """Nats of a density per image → bits/dim (a share of the figure; no bin offset)."""
    return nats / (dims * math.log(2))


def evaluate(study: Study, summary: dict, dequantize: bool, sizes: dict) -> dict:
    """The full ELBO (`cdm nll`), the ODE on a subset and the class-by-class decomposition of one trained model."""
    key = hashlib.sha256(f"{summary['checkpoint']}|{dequantize}|{sizes['elbo_stride']}".encode()).hexdigest()[:12]
    options = ["--method", "one-pass,elbo", "--elbo-stride", str(sizes["elbo_stride"]), "--workers", "0"]
    options += ["--dequantize"] if dequantize else []
    seconds, nll = score_test_split("nll", summary, study.work / "consistency-nll" / key, *options, log=study.log)

    start = time.perf_counter()
    trained = load_trained_model(summary["checkpoint"])
    model, schedule = trained.model.eval(), trained.schedule
    images, _ = load_split(summary["dataset"], "test")
    x_np = to_model_input(images)[: sizes["digits"]]
    if dequantize:  # the same per-digit noise as `cdm nll --dequantize` (seed 0)
        x_np = x_np + dequantization_noise(np.arange(len(x_np)), x_np.shape[1:], 0) * np.float32(2.0 / 255.0)
    x = torch.from_numpy(np.ascontiguousarray(x_np))
    dims = x[0].numel()
    with torch.no_grad():
        logits = model(x)
    one_pass = one_pass_increments(logits, trained.prior)
    log_px = log_likelihood_from_logits(logits.double(), x.double(), trained.prior)
    n_dec = min(sizes["decomposition_digits"], len(x))
    one_pass = one_pass[:n_dec]
    implied = implied_increments(model, x[:n_dec], schedule, nodes=sizes["nodes"], probes=sizes["probes"])
    base = log_normal(x[:n_dec])
    decomposition_s = time.perf_counter() - start

    start = time.perf_counter()
    n_ode = min(sizes["ode_digits"], len(x))
    log_ode, nfe = ode_log_likelihood(
        cdm_continuous_eps_fn(model, schedule),
        x[:n_ode],
        schedule,
        rtol=sizes["ode_tol"],
        atol=sizes["ode_tol"],
        trace="hutchinson",
        generator=sample_generators(np.arange(n_ode), 0, PROBE_TAG, "cpu"),
    )
    ode_s = time.perf_counter() - start
    methods = nll["methods"]
    return {
        "one_pass_bpd": methods["one-pass"]["nll_bpd"],
        "elbo_bpd": methods["elbo"]["nll_bpd"],
        "gap_bpd": methods["one-pass"]["nll_bpd"] - methods["elbo"]["nll_bpd"],
        "ode_bpd_subset": float(nats_to_bits_per_dim(log_ode.double(), dims).mean()),
        "one_pass_bpd_subset": float(nats_to_bits_per_dim(log_px[:n_ode], dims).mean()),
        "ode_nfe": nfe,
        "ode_digits": n_ode,
        "link01_nats": nll["consistency"]["link01_nats"],
        "link01_expected_nats": nll["consistency"]["link01_expected_nats"],
        "elbo_nfe": methods["elbo"]["nfe_per_sample"],
        "decomposition": {
            "digits": n_dec,
            "dims": dims,
            # mean over the digits of each increment log p_t(x) − log p_{t+1}(x), nats, t = 0..T
            "one_pass_nats": one_pass.mean(0).tolist(),
            "implied_nats": implied.mean(0).tolist(),
            "log_normal_nats": float(base.mean()),
            "implied_log_p0_bpd": float(nats_to_bits_per_dim(implied.sum(1) + base, dims).mean()),
            "one_pass_log_p0_bpd": float(nats_to_bits_per_dim(one_pass.sum(1) + base, dims).mean()),
        },
        "seconds": {"nll": seconds, "decomposition": decomposition_s, "ode": ode_s},
    }


def shown(s: dict, digits: int) -> str:
    sd = "" if s["sd"] is None else f" ± {s['sd']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{sd}"


def where_the_gap_sits(per_seed: dict, seeds: list[int], row: str) -> dict:
    """One-pass − ε̂-implied, in bits/dim: at the 0 → 1 link, and over classes 1 … T+1 (mean over seeds)."""
    link, rest = [], []
    for s in seeds:
        d = per_seed[s][row]["decomposition"]
        diff = -bits(np.array(d["one_pass_nats"]) - np.array(d["implied_nats"]), d["dims"])
        link.append(float(diff[0]))
        rest.append(float(diff[1:].sum()))
    return {"link01_bpd": spread(link), "classes_1_to_T_bpd": spread(rest)}


def plot(per_seed: dict, seeds: list[int], rows: list[str], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    d0 = per_seed[seeds[0]]
    for i, row in enumerate(("paper", "dequantized")):
        d = d0[row]["decomposition"]
        t = np.arange(len(d["one_pass_nats"]))
        left.plot(t + 1, -bits(np.array(d["one_pass_nats"]), d["dims"]), color=f"C{i}", label=f"{row}: one pass")
        left.plot(t + 1, -bits(np.array(d["implied_nats"]), d["dims"]), color=f"C{i}", ls="--", label=f"{row}: ε̂")
    expected = d0["paper"]["link01_expected_nats"]
    left.plot([1], [-bits(expected, d0["paper"]["decomposition"]["dims"])], "k*", ms=10, label="8-bit scale of ℓ₀−ℓ₁")
    left.set(
        xscale="log",
        xlabel="class interval t → t+1 (plotted at t+1)",
        ylabel="−(log p_t − log p_{t+1}) at the test digits, bits/dim",
        title=f"each increment, mean over test digits (seed {seeds[0]})",
    )
    left.axhline(0, color="grey", lw=0.6)
    left.legend(fontsize=7)
    for i, row in enumerate(rows):
        curves = []
        for s in seeds:
            d = per_seed[s][row]["decomposition"]
            diff = -bits(np.array(d["one_pass_nats"]) - np.array(d["implied_nats"]), d["dims"])
            curves.append(np.cumsum(diff[::-1])[::-1])  # Σ_{u ≥ t}: the error of log p_t
        mean = np.mean(curves, axis=0)
        right.plot(np.arange(len(mean)) + 1, mean, color=f"C{i}", label=LABELS[row])
    right.axhline(0, color="grey", lw=0.6)
    right.set(
        xscale="log",
        xlabel="class t (plotted at t+1)",
        ylabel="one pass − ε̂-implied, bits/dim",
        title=f"log p_t at the test digits: where they part (mean of seeds {', '.join(map(str, seeds))})",
    )
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if not args.smoke else [0]
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    rows = {r: ROWS[r] for r in (SMOKE_ROWS if args.smoke else ROWS)}
    with Study(
        "consistency",
        "One pass, ELBO and ODE of the same CDMs: when is one pass a density",
        argv=["--smoke"] if args.smoke else [],
    ) as study:
        per_seed: dict[int, dict] = {}
        for seed in seeds:
            per_seed[seed] = {}
            for row, overrides in rows.items():
                summary = study.run(
                    f"{row}-seed{seed}", *BASE, *overrides, f"train.train.seed={seed}", f"sample.seed={seed}"
                )
                m = summary["metrics"]
                per_seed[seed][row] = {
                    **evaluate(study, summary, row == "dequantized", sizes),
                    "fd": fd_metric(m),
                    "workflow_one_pass_bpd": m.get("eval/nll_bpd"),
                    "workflow_run_id": summary["parent_run_id"],
                    "workflow_seconds": summary["seconds"],
                }
                print(row, seed, {k: v for k, v in per_seed[seed][row].items() if k != "decomposition"}, flush=True)
        keys = ("one_pass_bpd", "elbo_bpd", "ode_bpd_subset", "one_pass_bpd_subset", "gap_bpd", "link01_nats", "fd")
        over_seeds = {row: {k: spread([per_seed[s][row][k] for s in seeds]) for k in keys} for row in rows}
        gaps = {row: where_the_gap_sits(per_seed, seeds, row) for row in rows}
        expected = per_seed[seeds[0]]["paper"]["link01_expected_nats"]
        lines = [
            [
                LABELS[row],
                shown(f["one_pass_bpd"], 2),
                shown(f["elbo_bpd"], 2),
                f"{shown(f['ode_bpd_subset'], 2)} ({shown(f['one_pass_bpd_subset'], 2)})",
                shown(f["gap_bpd"], 2),
                shown(f["link01_nats"], 1),
                shown(f["fd"], 2),
            ]
            for row, f in over_seeds.items()
        ]
        table = markdown_table(
            [
                "model",
                "one pass",
                "ELBO",
                f"ODE, {sizes['ode_digits']} digits (one pass on them)",
                "gap one pass − ELBO",
                f"mean ℓ₀ − ℓ₁, nats (8-bit scale {expected:.0f})",
                "FD DDIM-50",
            ],
            lines,
        )
        table += "\n\n" + markdown_table(
            ["model", "one pass − ε̂-implied at 0 → 1, bits/dim", "… over the steps 1 → 2 … T → T+1"],
            [[LABELS[r], shown(g["link01_bpd"], 2), shown(g["classes_1_to_T_bpd"], 2)] for r, g in gaps.items()],
        )
        conventions = CONVENTIONS.format(seeds=", ".join(map(str, seeds)), n=len(seeds), **sizes)
        table += "\n\n" + conventions
        results = {
            "seeds": seeds,
            "steps": {row: STEPS * (LONGER if row == "longer" else 1) for row in rows},
            "settings": {"base": BASE, "rows": rows, "sizes": sizes},
            # per model (configuration = row-seedN), as the other studies; then mean and sd over the seeds
            "figures": {f"{row}-seed{s}": per_seed[s][row] for s in seeds for row in rows},
            "over_seeds": over_seeds,
            "where_the_gap_sits": gaps,
            "conventions": conventions,
        }
        figure = study.out(HERE) / "decomposition.png"
        plot(per_seed, seeds, list(rows), figure)
        study.finish(HERE, results, table, figures=[figure])


CONVENTIONS = (
    "Data: sklearn's 8×8 digits (1,618 train, 179 test), not mnist5k: its 28×28 models train ~8 min each on 2 "
    "CPU cores, past this study's budget. Bits/dim are 8-bit ones, standard convention (−log p(x)/(d·ln 2) + "
    "log₂ 127.5: a density times the 2/255 bin of a 256-level pixel); the digits have only 17 grey levels "
    "(0…16 scaled to 0…255), so a model that knew nothing but that support (uniform over 17 levels, pixels "
    "independent) would score log₂ 17 = 4.09 bits/dim, and these figures are not comparable with 256-level "
    "images'. One pass and ℓ₀ − ℓ₁: all 179 test digits, at the 8-bit values, or for the dequantized row at "
    "the values plus u·2/255 (seeded; its one pass then bounds the discrete NLL in expectation). ELBO: the "
    "DDPM bound over the T = 100 classes (stride {elbo_stride}) on the 8-bit values (a discrete NLL bound, "
    "comparable with one pass). ODE: dopri5, rtol = atol = {ode_tol:g}, Hutchinson trace, on the first "
    "{ode_digits} test digits (the one-pass mean on the same digits in brackets). 8-bit scale of ℓ₀ − ℓ₁: "
    "d·ln(√(2π)·s₁/Δ), Δ = 2/255, the value at which Theorem 3.2 gives bin probability ÷ bin volume at an "
    "isolated grid point. Decomposition: mean over the first {decomposition_digits} test digits of "
    "log p_t − log p_{{t+1}} from the logits (one pass) and from the continuity equation of the model's ε̂ "
    "({nodes} Gauss–Legendre nodes per class interval, {probes} Hutchinson probes); the steps 1 → 2 … T → T+1 "
    "sum the classes 1…T and the last step to N(0, I). ± is the sample standard deviation over seeds {seeds} "
    "(n = {n})."
)


if __name__ == "__main__":
    main()
