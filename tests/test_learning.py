"""A CDM learns a 2-D mixture on CPU; CE alone and MSE alone each fail (paper Table 1, in miniature)."""

import pytest
import torch

from cdm_core.mixture import toy_mixture
from cdm_core.objective import denoise, log_likelihood, noise_data
from cdm_core.schedules import get_schedule
from cdm_core.toy import train_vector_cdm

T = 100
STEPS = 1000


@pytest.fixture(scope="module")
def setup():
    mixture = toy_mixture()
    schedule = get_schedule("linear", T)
    entropy, entropy_se = mixture.entropy()
    held_out, _ = mixture.sample(20000, torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(1, T + 1, (held_out.shape[0],), generator=gen)
    x_t = noise_data(held_out, t, schedule, torch.randn(held_out.shape, generator=gen, dtype=torch.float64))
    eps_bayes = mixture.posterior_mean_noise(x_t, t, schedule)
    return mixture, schedule, entropy, entropy_se, held_out, (x_t, t, eps_bayes)


def evaluate(model, setup):
    mixture, schedule, entropy, _, held_out, (x_t, t, eps_bayes) = setup
    nll = -log_likelihood(model, held_out.float(), schedule).double().mean().item()
    eps_hat = denoise(model, x_t.float(), t, schedule.to(dtype=torch.float32)).double()
    excess_mse = ((eps_hat - eps_bayes) ** 2).mean().item()  # distance from the MMSE denoiser
    return nll, excess_mse


def fit(setup, w_ce, w_mse):
    mixture, schedule = setup[0], setup[1]
    sample_fn = lambda n, g: mixture.sample(n, g)[0]  # noqa: E731
    return train_vector_cdm(sample_fn, 2, schedule, steps=STEPS, w_ce=w_ce, w_mse=w_mse, seed=0)


@pytest.fixture(scope="module")
def results(setup):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLP: threads only contend on a 2-core machine
    try:
        return {
            name: evaluate(fit(setup, w_ce, w_mse), setup)
            for name, (w_ce, w_mse) in {"both": (0.1, 1.0), "ce_only": (1.0, 0.0), "mse_only": (0.0, 1.0)}.items()
        }
    finally:
        torch.set_num_threads(threads)


def test_cdm_reaches_the_true_entropy(setup, results):
    entropy, entropy_se = setup[2], setup[3]
    nll, excess_mse = results["both"]
    print(f"entropy {entropy:.3f}±{entropy_se:.3f}; (NLL, excess MSE): {results}")
    assert entropy_se < 0.01
    assert abs(nll - entropy) <= 0.15, f"held-out NLL {nll:.3f} nats vs true entropy {entropy:.3f}"
    assert excess_mse < 0.01


def test_ce_only_is_worse_at_denoising(results):
    assert results["ce_only"][1] > 3 * results["both"][1], results


def test_mse_only_is_worse_at_likelihood(setup, results):
    entropy = setup[2]
    gap_both = abs(results["both"][0] - entropy)
    gap_mse_only = abs(results["mse_only"][0] - entropy)
    assert gap_mse_only > 1.0 and gap_mse_only > 5 * gap_both, results
