"""Table 1 in miniature: both losses are needed. CE-only, MSE-only and CE+MSE training of the same CDM.

The paper (CIFAR-10): NLL 8.27 / 9.32 / 3.38 bits/dim and FID 329 / 7.65 / 7.56 for CE-only / MSE-only /
both. Here: `studies/miniature.toml` on sklearn's 8×8 digits, the three loss settings below, each scored
by its workflow: the noise-level classifier's accuracy, CE and denoising MSE on the 179 test digits
(validation at the end of training, 20 noise levels), FD of 500 DDIM-50 samples in a digits classifier's
features, and the one-pass NLL of the test digits.

    python studies/table1/run.py [--smoke]          (~12 min on 2 CPU cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Study, fd_metric, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGURATIONS = {  # the miniature's loss is the paper's: w_ce = 1e-3, w_mse = 1
    "ce_only": ["train.loss.w_mse=0"],
    "mse_only": ["train.loss.w_ce=0"],
    "both": [],
}
PAPER = {"ce_only": (8.27, 329), "mse_only": (9.32, 7.65), "both": (3.38, 7.56)}  # (NLL bits/dim, FID)


def plot(figures: dict, path: Path) -> None:
    """Four panels, one bar per loss: MSE, FD, NLL (± its 95% interval) and accuracy."""
    names = list(figures)
    labels = [n.replace("_", "-") for n in names]
    fig = Figure(figsize=(11, 3))
    panels = fig.subplots(1, 4)
    for ax, key, title in zip(
        panels, ("mse", "fd", "nll_bpd", "accuracy"), ("MSE (ε)", "FD (DDIM-50)", "NLL bits/dim", "accuracy")
    ):
        errors = [figures[n]["nll_bpd_ci95"] for n in names] if key == "nll_bpd" else None
        ax.bar(labels, [figures[n][key] for n in names], yerr=errors, color=["C0", "C1", "C2"][: len(names)])
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(title)
    fig.suptitle("Table 1 in miniature: 8×8 digits, one CDM, three losses")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    with Study("table1", "Table 1 in miniature: CE-only, MSE-only and CE+MSE training of one CDM") as study:
        rows, figures = [], {}
        for name, overrides in CONFIGURATIONS.items():
            summary = study.run(name, *overrides)
            m = summary["metrics"]
            figures[name] = {
                "accuracy": m.get("val/accuracy"),
                "ce": m.get("val/ce"),
                "mse": m.get("val/mse"),
                "fd": fd_metric(m),
                "nll_bpd": m["eval/nll_bpd"],
                "nll_bpd_ci95": m["eval/nll_bpd_ci95"],
                "workflow_run_id": summary["parent_run_id"],
                "seconds": summary["seconds"],
            }
            f = figures[name]
            rows.append(
                [
                    name.replace("_", "-"),
                    f"{f['accuracy']:.3f}",
                    f"{f['ce']:.3f}",
                    f"{f['mse']:.4f}",
                    f"{f['fd']:.2f}",
                    f"{f['nll_bpd']:.2f} ± {f['nll_bpd_ci95']:.2f}",
                    f"{PAPER[name][0]} / {PAPER[name][1]}",
                ]
            )
        table = markdown_table(
            ["loss", "accuracy", "CE", "MSE", "FD (DDIM-50)", "NLL bits/dim", "paper NLL / FID (CIFAR-10)"], rows
        )
        results = {
            "figures": figures,
            "conventions": (
                "accuracy: argmax_t of the logits = t at 20 evenly spaced t of 1..100 on the 179 test digits; CE "
                "(nats) and MSE (per dimension, ε-prediction) on the same noise; FD: 500 DDIM-50 samples against "
                "the 1,618 train digits in a digits classifier's penultimate features (not Inception: no FID); "
                "NLL: one forward pass, standard convention (log-likelihood of x in [-1, 1] plus D·log 127.5), no "
                "dequantization, mean over the test digits ± its 95% interval. One seed."
            ),
            "paper": {k: {"nll_bpd": v[0], "fid": v[1]} for k, v in PAPER.items()},
        }
        figure = study.out(HERE) / "table1.png"
        plot(figures, figure)
        study.finish(HERE, results, table, figures=[figure])


if __name__ == "__main__":
    main()
