"""cdm_core: classification diffusion models in pure PyTorch.

The science lives here and nowhere else: noise schedules, the CDM objective,
denoiser and one-pass likelihood, networks, samplers, EMA, checkpoints and the
Fréchet distance. No Ray, no MLflow, no file formats beyond torch.save.
"""
