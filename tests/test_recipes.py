"""The paper's recipes, held against the paper: every paper config as `cdm train CONFIG --print-config` resolves it.

Each row names a setting, its value in the paper (or, where the paper is silent, in its official code,
github shaharYadin/CDM) and where that value is stated, so an edit of a config or of a default that
drifts from the paper fails here with the citation in the message. The architecture rows are read off
the network the config builds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.common import config as cfg
from pipelines.train.config import TrainConfig
from pipelines.train.step import build_network

CDM = str(Path(sys.executable).with_name("cdm"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = ("cifar10", "cifar10_uniform", "cifar10_ot", "cifar10_cond", "celeba64")

# (setting, value, where the paper or its code says so): for every paper config.
EVERY = [
    ("schedule.T", 1000, "App. C: T = 1000 noise levels; official config.yaml noise_steps: 1000"),
    ("loss.w_ce", 1e-3, "App. C.2: CE weight 1e-3; official config.yaml ce_factor: 0.001"),
    ("loss.w_mse", 1.0, "App. C.2: MSE weight 1; official config.yaml mse_factor: 1"),
    ("optim.betas", [0.9, 0.999], "official main.py: torch.optim.Adam(model.parameters(), lr=lr), Adam's defaults"),
    ("optim.eps", 1e-8, "official main.py: Adam's default eps"),
    ("optim.weight_decay", 0.0, "official main.py: Adam, no weight decay"),
    ("optim.grad_clip", 0.0, "neither the paper nor the official cdm.py clips gradients"),
    ("ema.decay", 0.9999, "App. C.2: EMA 0.9999; official config.yaml ema_factor: 0.9999"),
    ("ema.start_step", 5000, "official cdm.py: step_start_ema = 5000 (copies the weights before)"),
    (
        "train.batch_size",
        512,
        "inferred: official config.yaml batch_size 128 per process (accelerate) × the paper's 4 GPUs",
    ),
    ("data.flip", True, "App. C.2: horizontal flips; official main.py RandomHorizontalFlip"),
    ("data.dequantize", False, "App. C.2 names no dequantization, and the official code trains without it"),
    ("model.kind", "cdm", "a CDM, not the DDM baseline"),
]

# (config, setting, value, citation): what differs between the paper's models.
EACH = [
    ("cifar10", "schedule.name", "linear", "Sec. 4 / App. C: the DDPM linear schedule, β 1e-4 … 0.02"),
    ("cifar10", "optim.lr", 2e-4, "App. C.2: lr 2e-4"),
    ("cifar10", "optim.warmup_steps", 5000, "App. C.2: 5k warm-up; official cdm.py lr_lambda (step+1)/5000"),
    ("cifar10", "optim.decay_every", 200_000, "App. C.2: ×0.1 every 200k; official cdm.py 0.1 ** (step // 200000)"),
    ("cifar10", "optim.decay_factor", 0.1, "App. C.2: ×0.1 every 200k"),
    ("cifar10", "train.steps", 500_000, "App. C.2: 500k iterations; official config.yaml num_iterations: 500000"),
    ("cifar10", "model.conditional", False, "Table 3: the unconditional model"),
    ("cifar10_uniform", "schedule.name", "uniform", "Sec. 4.3: CDM (unif.)"),
    ("cifar10_uniform", "optim.lr", 1e-4, "App. C.2.2: CDM (unif.) lr 1e-4"),
    ("cifar10_uniform", "optim.decay_every", 200_000, "App. C.2.2: as the linear recipe otherwise"),
    ("cifar10_uniform", "train.steps", 500_000, "App. C.2.2: as the linear recipe otherwise"),
    ("cifar10_ot", "schedule.name", "ot", "Sec. 4.3: CDM (OT), a = 1 − τ, s = τ"),
    ("cifar10_ot", "optim.lr", 1e-4, "App. C.2.2: CDM (OT) lr 1e-4"),
    ("cifar10_ot", "optim.decay_every", 0, "App. C.2.2: CDM (OT) without a learning-rate scheduler"),
    ("cifar10_ot", "optim.warmup_steps", 0, "App. C.2.2: without a learning-rate scheduler (read: no warm-up)"),
    ("cifar10_ot", "train.steps", 1_000_000, "App. C.2.2: CDM (OT) 1M iterations"),
    ("cifar10_cond", "schedule.name", "linear", "Sec. 4.2: the conditional model on the linear schedule"),
    ("cifar10_cond", "optim.lr", 2e-4, "App. C.2: as the unconditional CIFAR-10 recipe"),
    ("cifar10_cond", "model.conditional", True, "Sec. 4.2: class-conditional, classifier-free guidance"),
    ("cifar10_cond", "model.label_dropout", 0.1, "Sec. 4.2: null label for 10% of the training labels"),
    ("celeba64", "schedule.name", "linear", "App. C: CelebA on the linear schedule"),
    ("celeba64", "optim.lr", 1e-4, "App. C.2: CelebA lr 1e-4"),
    ("celeba64", "optim.decay_every", 200_000, "App. C.2: as the CIFAR-10 recipe otherwise"),
    ("celeba64", "train.steps", 500_000, "App. C.2: as the CIFAR-10 recipe otherwise"),
]

# (config, architecture attribute, value, citation): read off the network the config builds.
ARCHITECTURE = [
    ("cifar10", "base_channels", 128, "App. C.1: the DDPM CIFAR-10 U-Net, ch 128; official main.py channels=128"),
    ("cifar10", "channel_mult", (1, 2, 2, 2), "App. C.1; official main.py ddpm_unet_small ch_mult=[1, 2, 2, 2]"),
    ("cifar10", "num_res_blocks", 2, "App. C.1; official main.py num_res_blocks=2"),
    ("cifar10", "attn_resolutions", (16,), "App. C.1; official main.py attn_resolutions=[16,]"),
    ("cifar10", "dropout", 0.1, "App. C.1; official main.py dropout=0.1"),
    ("cifar10", "head_channels", 512, "App. C.1: the head conv outputs 512 channels for CIFAR-10"),
    ("cifar10", "downsample", "official", "DDPM / official models/diffusion.py: pad right and bottom, conv stride 2"),
    ("cifar10", "norm_eps", 1e-6, "official models/diffusion.py: GroupNorm eps=1e-6"),
    ("celeba64", "channel_mult", (1, 2, 2, 2, 4), "App. C.1; official main.py ddpm_unet_large ch_mult=[1, 2, 2, 2, 4]"),
    ("celeba64", "attn_resolutions", (16,), "official main.py ddpm_unet_large attn_resolutions=[16,]"),
    ("celeba64", "head_channels", 1024, "App. C.1: the head conv outputs 1024 channels for CelebA 64×64"),
]


def resolved(name: str) -> dict:
    """What `cdm train CONFIG --print-config` prints: the config as the run would use it."""
    out = subprocess.run(
        [CDM, "train", str(CONFIGS / f"{name}.toml"), "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def printed() -> dict[str, dict]:
    return {name: cfg.flatten(resolved(name)) for name in PAPER}


@pytest.mark.parametrize("name", PAPER)
def test_every_paper_config_has_the_paper_s_shared_recipe(printed, name):
    wrong = [
        f"{key} = {printed[name][key]!r}, the paper's {value!r} ({why})"
        for key, value, why in EVERY
        if printed[name][key] != value
    ]
    assert not wrong, f"configs/{name}.toml: " + "; ".join(wrong)


@pytest.mark.parametrize(("name", "key", "value", "why"), EACH, ids=[f"{n}:{k}" for n, k, _, _ in EACH])
def test_each_paper_config_has_its_own_settings(printed, name, key, value, why):
    assert printed[name][key] == value, (
        f"configs/{name}.toml: {key} = {printed[name][key]!r}, the paper's {value!r} ({why})"
    )


@pytest.mark.parametrize(
    ("name", "attr", "value", "why"), ARCHITECTURE, ids=[f"{n}:{a}" for n, a, _, _ in ARCHITECTURE]
)
def test_the_network_of_each_paper_config_is_the_paper_s(name, attr, value, why):
    config = cfg.load(TrainConfig, CONFIGS / f"{name}.toml")
    shape = (3, 64, 64) if name == "celeba64" else (3, 32, 32)
    network = build_network(config, shape[0], shape[1])
    assert getattr(network.config, attr) == value, (
        f"configs/{name}.toml: {attr} = {getattr(network.config, attr)!r} ({why})"
    )


def test_the_head_the_norms_and_the_downsampling_are_built_as_configured():
    """Not just recorded: the head conv's width, every GroupNorm's eps, the stride-2 convs' padding."""
    network = build_network(cfg.load(TrainConfig, CONFIGS / "cifar10.toml"), 3, 32)
    assert network.head_conv.out_channels == 512 and network.logit_increments.in_features == 512
    norms = [m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.eps for m in norms} == {1e-6}
    strided = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3 and all(m.padding == (0, 0) for m in strided)
    x = torch.zeros(2, 3, 32, 32)
    assert network(x).shape == (2, 1002)
