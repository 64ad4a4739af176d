"""Networks: shapes, the cumsum parametrisation, double backward, labels, specs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdm_core.networks import (
    LEGACY_FIELDS,
    Downsample,
    MLPClassifier,
    MLPDenoiser,
    ResBlock,
    UNetClassifier,
    UNetConfig,
    UNetDenoiser,
    build_model,
    count_parameters,
    downsampled_size,
    group_norm,
    model_spec,
    unet_preset,
)
from pipelines.common import config as cfg_io
from pipelines.common.config import ConfigError
from pipelines.train.config import TrainConfig
from pipelines.train.step import build_network

T = 10  # noise levels in the small test models: T + 2 = 12 classes


def randomise(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Perturb every parameter: zero-initialised residual branches otherwise hide
    whole paths (labels, conv1 weights) from outputs and gradients at init."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# (preset, channels, image size, num_labels)
SMALL_CASES = [
    ("tiny", 1, 8, None),
    ("tiny", 1, 16, None),
    ("tiny", 1, 28, None),
    ("tiny", 3, 32, 10),
]


@pytest.mark.parametrize("preset,channels,size,num_labels", SMALL_CASES + [("mnist", 1, 28, 10)])
def test_unet_classifier_shapes(preset, channels, size, num_labels):
    torch.manual_seed(0)
    model = UNetClassifier(unet_preset(preset, channels, size, num_labels), T).eval()
    x = torch.randn(2, channels, size, size)
    y = torch.tensor([0, 1]) if num_labels else None
    logits = model(x, y)
    assert logits.shape == (2, T + 2)
    assert torch.isfinite(logits).all()
    assert model.data_shape == (channels, size, size)


@pytest.mark.parametrize("preset,channels,size,num_labels", SMALL_CASES + [("mnist", 1, 28, None)])
def test_unet_denoiser_shapes(preset, channels, size, num_labels):
    torch.manual_seed(0)
    model = randomise(UNetDenoiser(unet_preset(preset, channels, size, num_labels), T)).eval()
    x = torch.randn(2, channels, size, size)
    y = torch.tensor([0, 1]) if num_labels else None
    eps = model(x, torch.tensor([0, T + 1]), y)
    assert eps.shape == x.shape
    assert torch.isfinite(eps).all()
    if preset == "tiny":  # cheap enough for four more passes
        # A scalar t broadcasts over the batch.
        assert torch.allclose(model(x, 3, y), model(x, torch.tensor([3, 3]), y))
        # The time input matters.
        assert not torch.allclose(model(x, 0, y), model(x, T + 1, y))


def test_unet_resolutions_for_odd_sizes():
    assert unet_preset("mnist", 1, 28).resolutions() == (28, 14, 7)
    assert unet_preset("mnist", 1, 28).attn_resolutions == (14,)
    assert unet_preset("tiny", 1, 8).attn_resolutions == (4,)
    assert unet_preset("tiny", 1, 16).attn_resolutions == (8,)
    assert unet_preset("tiny", 1, 28).attn_resolutions == (14,)
    assert unet_preset("cifar10", 3, 32).resolutions() == (32, 16, 8, 4)
    assert unet_preset("celeba64", 3, 64).resolutions() == (64, 32, 16, 8, 4)
    # cifar10 architecture on a 28 px input: the official downsampling gives 28 -> 14 -> 7 -> 3,
    # the symmetric one 28 -> 14 -> 7 -> 4; both come back to 28.
    for mode, sizes in (("official", (28, 14, 7, 3)), ("symmetric", (28, 14, 7, 4))):
        cfg = UNetConfig(1, 28, 16, (1, 2, 2, 2), 1, (14,), 0.0, downsample=mode)
        assert cfg.resolutions() == sizes
        assert UNetClassifier(cfg, T)(torch.randn(1, 1, 28, 28)).shape == (1, T + 2)
        assert UNetDenoiser(cfg, T)(torch.randn(1, 1, 28, 28), 1).shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match=r"image_size=4 is too small .* \(4, 2, 1, 0\)"):
        UNetConfig(1, 4, 16, (1, 2, 2, 2), 1, (), 0.0)


@pytest.mark.parametrize("mode", ["official", "symmetric"])
def test_downsampled_size_is_the_conv_arithmetic(mode):
    layer = Downsample(1, mode)
    for n in range(2, 20):
        assert layer(torch.zeros(1, 1, n, n)).shape[-1] == downsampled_size(n, mode), n
    assert [downsampled_size(n, mode) for n in (7, 8, 28, 32)] == (
        [3, 4, 14, 16] if mode == "official" else [4, 4, 14, 16]
    )


def test_official_downsampling_equals_the_reference():
    """DDPM / the official CDM code: zero-pad right and bottom by one, then a 3×3 stride-2 conv without padding."""
    torch.manual_seed(0)
    official, symmetric = Downsample(4, "official"), Downsample(4, "symmetric")
    symmetric.load_state_dict(official.state_dict())  # same weights, same keys
    w, b = official.conv.weight, official.conv.bias
    for n in (8, 7):
        x = torch.randn(2, 4, n, n)
        torch.testing.assert_close(official(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2, padding=0))
        torch.testing.assert_close(symmetric(x), F.conv2d(x, w, b, stride=2, padding=1))
    # The two sample grids one pixel apart: away from the top/left edge, the official output is
    # the symmetric one of the input moved up and left by a pixel.
    x = torch.randn(1, 4, 8, 8)
    assert not torch.allclose(official(x), symmetric(x))
    moved = F.pad(x[..., 1:, 1:], (0, 1, 0, 1))
    torch.testing.assert_close(official(x)[..., 1:, 1:], symmetric(moved)[..., 1:, 1:])


def test_group_norm_eps():
    new = [UNetClassifier(unet_preset("tiny", 1, 8, 3), T), UNetDenoiser(unet_preset("tiny", 1, 8), T)]
    legacy = UNetClassifier(UNetConfig(1, 8, 32, (1, 2), 1, (4,), 0.0, **LEGACY_FIELDS), T)
    for model, eps in [(m, 1e-6) for m in new] + [(legacy, 1e-5)]:
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert len(norms) > 5 and {m.eps for m in norms} == {eps}


def test_config_validation():
    with pytest.raises(ValueError, match="tiny, mnist, cifar10, celeba64"):
        unet_preset("resnet", 3, 32)
    with pytest.raises(ValueError, match="downsample must be one of official, symmetric"):
        UNetConfig(1, 8, 32, (1, 2), 1, (4,), 0.0, downsample="avgpool")
    with pytest.raises(ValueError, match="head_channels"):
        UNetConfig(1, 8, 32, (1, 2), 1, (4,), 0.0, head_channels=0)
    with pytest.raises(ValueError, match=r"attn_resolutions \[16\] do not occur"):
        unet_preset("cifar10", 1, 28)  # the paper's attention at 16 px needs a 32 px input
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(1, 8, 32, (1, 2), 1, (4,), 0.0, num_heads=3)
    # JSON round trips give lists; the config stores tuples.
    cfg = UNetConfig.from_dict(json.loads(json.dumps(unet_preset("mnist", 1, 28).to_dict())))
    assert cfg == unet_preset("mnist", 1, 28)
    assert set(LEGACY_FIELDS) <= set(cfg.to_dict())  # recorded in every spec
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**cfg.to_dict(), "channels": 3})


def test_group_norm_groups():
    assert group_norm(128).num_groups == 32  # the official GroupNorm(32, ·) at every width of the paper's models
    assert group_norm(64).num_groups == 32
    assert group_norm(48).num_groups == 24
    assert group_norm(32).num_groups == 16  # two channels per group, not one
    assert group_norm(3).num_groups == 1
    assert group_norm(32, min_group_channels=1).num_groups == 32  # what specs without the field were built with


@pytest.mark.parametrize("width", [32, 64])
def test_a_resblock_sees_its_embedding_at_every_width(width):
    """The embedding is added per channel just before the second GroupNorm: with one channel per group that
    normalization subtracts it again, and a tiny model's ResBlocks cannot see a label or a time step."""
    torch.manual_seed(0)
    x, emb = torch.randn(2, width, 4, 4), torch.randn(2, 16)

    def embedding_effect(min_group_channels: int) -> float:
        block = randomise(ResBlock(width, width, 16, 0.0, 1e-6, min_group_channels)).eval()
        return (block(x, emb) - block(x, emb.flip(0))).abs().max().item()

    assert embedding_effect(2) > 1e-2
    if width == 32:  # the legacy networks' bug, kept exactly for their checkpoints
        assert embedding_effect(1) < 1e-4


def test_paper_presets_parameter_counts():
    # Built on the meta device: shapes only, no memory, no init cost.
    with torch.device("meta"):
        cifar10, celeba64 = unet_preset("cifar10", 3, 32), unet_preset("celeba64", 3, 64)
        ddm = UNetDenoiser(cifar10, 1000)
        cdm = UNetClassifier(cifar10, 1000)
        cdm_official = UNetClassifier(dataclasses.replace(cifar10, head_channels=256), 1000)
        cdm_celeba = UNetClassifier(celeba64, 1000)
        cdm_celeba_official = UNetClassifier(dataclasses.replace(celeba64, head_channels=256), 1000)
    counts = {
        "cifar10 DDM": count_parameters(ddm),
        "cifar10 CDM (head 512)": count_parameters(cdm),
        "cifar10 CDM (head 256, official code)": count_parameters(cdm_official),
        "celeba64 CDM (head 1024)": count_parameters(cdm_celeba),
        "celeba64 CDM (head 256, official code)": count_parameters(cdm_celeba_official),
    }
    print(counts)
    # Ho et al. (2020) report 35.7M parameters for the CIFAR-10 DDPM.
    assert 35.6e6 < counts["cifar10 DDM"] < 35.8e6
    # No time MLP and no per-block time projections, but a 1002-way head. The head-256 counts equal
    # the official code's DDPM_Unet (checked against a transcription of models/diffusion.py).
    assert counts["cifar10 CDM (head 512)"] == 33_957_610
    assert counts["cifar10 CDM (head 256, official code)"] == 33_405_930
    assert counts["celeba64 CDM (head 1024)"] == 76_439_530
    assert counts["celeba64 CDM (head 256, official code)"] == 74_784_490
    # The head alone: conv 128 -> h (3×3) and Linear h -> 1002.
    head = lambda h: 128 * h * 9 + h + h * 1002 + 1002  # noqa: E731
    assert counts["cifar10 CDM (head 512)"] - counts["cifar10 CDM (head 256, official code)"] == head(512) - head(256)
    assert count_parameters(cdm) < count_parameters(ddm)


@pytest.mark.parametrize(
    "preset,channels,size,head",
    [("cifar10", 3, 32, 512), ("celeba64", 3, 64, 1024), ("mnist", 1, 28, 64), ("tiny", 1, 8, 32)],
)
def test_classifier_head_width_per_preset(preset, channels, size, head):
    """App. C.1: the head conv outputs 512 (CIFAR-10) and 1024 (CelebA-64) channels; small presets keep the backbone's."""
    config = unet_preset(preset, channels, size)
    assert config.head_channels == (head if preset in ("cifar10", "celeba64") else None)
    with torch.device("meta"):
        model = UNetClassifier(config, 1000)
        ddm = UNetDenoiser(config, 1000)
    assert model.head_conv.in_channels == config.base_channels
    assert model.head_conv.out_channels == head
    assert model.logit_increments.in_features == head
    assert ddm.head_conv.out_channels == channels  # the DDM's head is the image, whatever head_channels says


def test_train_config_head_channels():
    """model.head_channels overrides the preset's; the network's spec records it with the downsampling and eps."""

    def network(*overrides: str) -> nn.Module:
        config = cfg_io.load(TrainConfig, None, ["data.uri=unused", "model.preset=cifar10", *overrides])
        with torch.device("meta"):
            return build_network(config, 3, 32)

    assert network().head_conv.out_channels == 512
    model = network("model.head_channels=256")
    assert model.head_conv.out_channels == 256
    recorded = {"head_channels": 256, "downsample": "official", "norm_eps": 1e-6}
    assert recorded.items() <= model_spec(model)["config"].items()
    with pytest.raises(ConfigError, match="model.head_channels: 256 is the width of the CDM classifier's head"):
        network("model.kind=ddm", "model.head_channels=256")


def test_legacy_spec_rebuilds_the_legacy_network():
    """A spec saved before head_channels/downsample/norm_eps/min_group_channels existed rebuilds that network,
    bit for bit."""
    torch.manual_seed(0)
    # An odd size, so the two downsamplings differ in shape as well as in values.
    legacy_config = UNetConfig(1, 7, 32, (1, 2), 1, (4,), 0.0, **LEGACY_FIELDS)
    assert legacy_config.min_group_channels == 1 and legacy_config.downsample == "symmetric"
    legacy = randomise(UNetClassifier(legacy_config, T)).eval()
    old_spec = model_spec(legacy)
    for key in LEGACY_FIELDS:
        del old_spec["config"][key]
    rebuilt = build_model(json.loads(json.dumps(old_spec))).eval()
    assert rebuilt.config == legacy_config
    rebuilt.load_state_dict(legacy.state_dict())
    x = torch.randn(3, 1, 7, 7)
    assert torch.equal(rebuilt(x), legacy(x))
    # The same spec with today's defaults is another network: attention at 4 px no longer exists (7 -> 3).
    with pytest.raises(ValueError, match=r"attn_resolutions \[4\] do not occur"):
        UNetConfig(**old_spec["config"])


def test_cifar10_classifier_runs_one_image():
    torch.manual_seed(0)
    model = UNetClassifier(unet_preset("cifar10", 3, 32), 1000).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 1002)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_logits_are_cumsum_of_head_output(kind):
    torch.manual_seed(0)
    if kind == "unet":
        model, x = UNetClassifier(unet_preset("tiny", 1, 8), T), torch.randn(3, 1, 8, 8)
    else:
        model, x = MLPClassifier(2, T, hidden=32, depth=2), torch.randn(3, 2)
    captured = {}
    model.logit_increments.register_forward_hook(lambda m, i, o: captured.update(raw=o))
    logits = model(x)
    raw = captured["raw"]
    assert not torch.allclose(logits, raw)
    torch.testing.assert_close(logits, torch.cumsum(raw, dim=1))
    torch.testing.assert_close(logits[:, 0], raw[:, 0])
    torch.testing.assert_close(logits.diff(dim=1), raw[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "unet_conditional", "mlp"])
def test_input_gradient_and_double_backward(kind):
    """The CDM loss differentiates ∇_x[ℓ_{T+1} − ℓ_t] w.r.t. the parameters."""
    torch.manual_seed(0)
    y = None
    if kind == "mlp":
        model, x = MLPClassifier(2, T, hidden=32, depth=3), torch.randn(4, 2)
    else:
        labels = 5 if kind == "unet_conditional" else None
        model, x = UNetClassifier(unet_preset("tiny", 1, 8, labels), T), torch.randn(4, 1, 8, 8)
        if labels:
            y = torch.tensor([0, 1, 5, 2])  # 5 is the null label
    randomise(model)
    x.requires_grad_(True)
    logits = model(x, y)
    t = torch.tensor([0, 3, 7, T + 1])
    score_like = logits[:, -1] - logits.gather(1, t[:, None])[:, 0]
    (grad_x,) = torch.autograd.grad(score_like.sum(), x, create_graph=True)
    assert grad_x.shape == x.shape
    assert torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0
    loss = ((grad_x + x) ** 2).mean()
    loss.backward()
    no_grad = [
        name
        for name, p in model.named_parameters()
        # Biases after the head's last nonlinearity shift the logits by constants: no x-gradient.
        if name not in ("logit_increments.bias", "head_conv.bias") and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not no_grad, f"parameters without gradient through the double backward: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_double_backward_at_initialisation():
    """Zero-initialised residual convs must not cut the gradient to the head or the blocks' output convs."""
    torch.manual_seed(0)
    model = UNetClassifier(unet_preset("tiny", 1, 8), T)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    logits = model(x)
    (grad_x,) = torch.autograd.grad((logits[:, -1] - logits[:, 0]).sum(), x, create_graph=True)
    (grad_x**2).mean().backward()
    assert model.logit_increments.weight.grad.abs().sum() > 0
    assert model.backbone.encoder[0].res.conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["unet_classifier", "unet_denoiser", "mlp_classifier", "mlp_denoiser"])
def test_labels_and_null_label(kind):
    torch.manual_seed(0)
    num_labels = 4
    if kind.startswith("unet"):
        cls = UNetClassifier if kind == "unet_classifier" else UNetDenoiser
        model, x = cls(unet_preset("tiny", 1, 8, num_labels), T), torch.randn(2, 1, 8, 8)
    else:
        cls = MLPClassifier if kind == "mlp_classifier" else MLPDenoiser
        model, x = cls(2, T, hidden=32, depth=2, num_labels=num_labels), torch.randn(2, 2)
    randomise(model).eval()
    run = (lambda y: model(x, y)) if "classifier" in kind else (lambda y: model(x, 3, y))
    null = torch.full((2,), num_labels)
    torch.testing.assert_close(run(None), run(null))  # y=None is the null label
    torch.testing.assert_close(run(torch.tensor(num_labels)), run(null))  # a scalar label broadcasts
    assert not torch.allclose(run(torch.tensor([0, 1])), run(null))  # labels matter
    assert model.label_embed.num_embeddings == num_labels + 1


def test_unconditional_models_have_no_label_path():
    model = UNetClassifier(unet_preset("tiny", 1, 8), T)
    assert model.label_embed is None
    assert all(block.res.emb_proj is None for block in model.backbone.encoder if hasattr(block, "res"))
    assert not any("emb" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([0]))


def test_mlp_shapes():
    torch.manual_seed(0)
    x = torch.randn(5, 2)
    classifier = MLPClassifier(2, T, hidden=32, depth=3)
    assert classifier(x).shape == (5, T + 2)
    assert sum(isinstance(m, nn.Linear) for m in classifier.modules()) == 4  # input, 2 hidden, head
    denoiser = MLPDenoiser(2, T, hidden=32, depth=3)
    assert denoiser(x, torch.randint(0, T + 2, (5,))).shape == (5, 2)
    assert not any(isinstance(m, nn.ReLU) for m in classifier.modules())


SPEC_MODELS = [
    lambda: UNetClassifier(unet_preset("tiny", 1, 8), T),
    lambda: UNetClassifier(unet_preset("tiny", 3, 8, num_labels=10), T),
    lambda: UNetDenoiser(unet_preset("tiny", 1, 28), T),
    lambda: MLPClassifier(2, T, hidden=16, depth=2),
    lambda: MLPDenoiser(2, T, hidden=16, depth=2, num_labels=3),
]


@pytest.mark.parametrize("make", SPEC_MODELS)
def test_spec_round_trip(make):
    model = make()
    spec = model_spec(model)
    assert json.loads(json.dumps(spec)) == spec  # plain JSON types
    rebuilt = build_model(json.loads(json.dumps(spec)))
    assert type(rebuilt) is type(model)
    assert model_spec(rebuilt) == spec
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    assert count_parameters(rebuilt) == sum(p.numel() for p in model.parameters())


def test_spec_sees_through_wrappers_and_rejects_unknown():
    model = MLPClassifier(2, T, hidden=16, depth=2)
    assert model_spec(nn.DataParallel(model)) == model_spec(model)
    assert count_parameters(nn.DataParallel(model)) == count_parameters(model)
    with pytest.raises(TypeError, match="not a cdm network"):
        model_spec(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="known classes"):
        build_model({"class": "ResNet"})


def test_unet_config_is_replaceable():
    cfg = dataclasses.replace(unet_preset("tiny", 1, 8), base_channels=16)
    assert UNetClassifier(cfg, T)(torch.randn(1, 1, 8, 8)).shape == (1, T + 2)
