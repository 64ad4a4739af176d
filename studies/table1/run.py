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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Study, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGURATIONS = {  # the miniature's loss is the paper's: w_ce = 1e-3, w_mse = 1
    "ce_only": ["train.loss.w_mse=0"],
    "mse_only": ["train.loss.w_ce=0"],
    "both": [],
}
PAPER = {"ce_only": (8.27, 329), "mse_only": (9.32, 7.65), "both": (3.38, 7.56)}  # (NLL bits/dim, FID)


def fd_of(metrics: dict) -> float:
    (key,) = [k for k in metrics if k.startswith("eval/fd_")]
    return metrics[key]


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
                "fd": fd_of(m),
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
        study.finish(HERE, results, table)


if __name__ == "__main__":
    main()
