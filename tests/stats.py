"""Statistics shared by the sampling tests (CPU references and CUDA kernels)."""

import math

import torch


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.999)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Chi-square of token counts against probabilities `[V]`; bins with expected < 5 are pooled."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    exp = probs.double() * n
    big = exp >= 5
    stat = (((counts[big] - exp[big]) ** 2) / exp[big]).sum().item()
    rest_e, rest_c = exp[~big].sum().item(), counts[~big].sum().item()
    df = int(big.sum().item()) - 1
    if rest_e >= 5:
        stat += (rest_c - rest_e) ** 2 / rest_e
        df += 1
    return stat, df
