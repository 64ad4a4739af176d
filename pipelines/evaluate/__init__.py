"""Evaluation stages on pools of Ray workers: sample, NLL, OOD detection, FID / FD, and the FD feature classifier."""
