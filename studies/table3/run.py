"""Table 3 / Sec. 4.3 in miniature: the NLL of the same CDM trained with the linear, uniform and OT schedules.

The paper (CIFAR-10, one forward pass): 3.38 (linear), 2.98 (uniform), 2.89 (OT) bits/dim. Here:
`studies/miniature.toml` on sklearn's 8×8 digits (T = 100), the schedule the only change; NLL of the 179
test digits in one pass, and FD of 500 DDIM-50 samples beside it. The linear row is Table 1's CE+MSE model
(the same stages: run once when both studies run in one work folder).

    python studies/table3/run.py [--smoke]          (~10 min on 2 CPU cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Study, fd_metric, markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGURATIONS = {
    "linear": [],  # the miniature's: β from 1e-3 to 0.2 over T = 100
    "uniform": ["train.schedule.name=uniform", "train.schedule.params={}"],
    "ot": ["train.schedule.name=ot", "train.schedule.params={}"],
}
PAPER = {"linear": 3.38, "uniform": 2.98, "ot": 2.89}


def plot(figures: dict, path: Path) -> None:
    """NLL (± its 95% interval) and FD per schedule."""
    names = list(figures)
    fig = Figure(figsize=(7, 3))
    left, right = fig.subplots(1, 2)
    left.bar(names, [figures[n]["nll_bpd"] for n in names], yerr=[figures[n]["nll_bpd_ci95"] for n in names])
    left.set(title="NLL bits/dim (one pass)", ylim=(min(figures[n]["nll_bpd"] for n in names) - 0.5, None))
    right.bar(names, [figures[n]["fd"] for n in names], color="C1")
    right.set(title="FD (DDIM-50)")
    fig.suptitle("Table 3 in miniature: 8×8 digits, one CDM, three schedules")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    with Study("table3", "Table 3 in miniature: one CDM trained with the linear, uniform and OT schedules") as study:
        rows, figures = [], {}
        for name, overrides in CONFIGURATIONS.items():
            summary = study.run(name, *overrides)
            m = summary["metrics"]
            figures[name] = {
                "nll_bpd": m["eval/nll_bpd"],
                "nll_bpd_ci95": m["eval/nll_bpd_ci95"],
                "val_nll_bpd": m.get("val/nll_bpd"),
                "fd": fd_metric(m),
                "workflow_run_id": summary["parent_run_id"],
                "seconds": summary["seconds"],
            }
            f = figures[name]
            rows.append([name, f"{f['nll_bpd']:.3f} ± {f['nll_bpd_ci95']:.3f}", f"{f['fd']:.2f}", PAPER[name]])
        table = markdown_table(["schedule", "NLL bits/dim (one pass)", "FD (DDIM-50)", "paper NLL (CIFAR-10)"], rows)
        results = {
            "figures": figures,
            "conventions": (
                "NLL: one forward pass on the 179 test digits, standard convention (log-likelihood of x in [-1, 1] "
                "plus D·log 127.5), no dequantization, mean ± 95% interval; FD: 500 DDIM-50 samples against the "
                "1,618 train digits in a digits classifier's penultimate features. One seed."
            ),
            "paper": PAPER,
        }
        figure = study.out(HERE) / "table3.png"
        plot(figures, figure)
        study.finish(HERE, results, table, figures=[figure])


if __name__ == "__main__":
    main()
