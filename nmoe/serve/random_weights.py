"""Random weights at real scale (no checkpoint files).

`random_weights(cfg, experts, device)` returns exactly the dict `ckpt.load_weights` would (HF names,
FP8 e4m3 linear weights with 128x128 `weight_scale_inv`, BF16 embeddings / norms / router /
`lm_head`, fp32 router bias), for the routed experts of one rank only, generated on `device`.
`deepseek_v3_config(num_layers)` is DeepSeek-V3's config at any depth.
"""

from __future__ import annotations

import dataclasses

import torch

from nmoe.serve.ckpt import model_specs, scale_shape
from nmoe.serve.config import ModelConfig
from nmoe.serve.ops.fp8 import FP8, FP8_MAX

# ------------------------------------------------------------------------------------------------
# DeepSeek-V3's config and random tensors
# ------------------------------------------------------------------------------------------------

FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def deepseek_v3_config(num_layers: int | None = None) -> ModelConfig:
    """DeepSeek-V3's `config.json` (V3 / V3-0324 / R1 share it); `num_layers` keeps its shape at another depth."""
    cfg = ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, kv_lora_rank=512,
        q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        first_k_dense_replace=3, num_nextn_predict_layers=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, quantization_config=dict(FP8_QUANT),
    )
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    cfg.validate("deepseek_v3_config")
    return cfg


# FP8 codes are drawn N(0, CODE_STD) (clipped to +-448) and every block scale is std / CODE_STD, so a
# dequantized weight is about N(0, std) with std = fan_in^-1/2, as trained layers roughly are.
CODE_STD = 32.0


def random_weights(cfg: ModelConfig, experts=None, device: str | torch.device = "cpu",
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor inference reads (routed experts limited to `experts`), generated on `device`.

    FP8 specs come as e4m3 codes + fp32 `weight_scale_inv` (each block scale varied by +-10%), which
    needs `cfg.quantization_config`; without it linear weights are BF16."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in model_specs(cfg, experts).items():
        shape = spec.shape
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16)
        elif name.endswith("e_score_correction_bias"):
            out[name] = 0.05 * torch.randn(shape, generator=g, device=device)
        elif spec.kind == "fp8":
            std = shape[1] ** -0.5
            codes = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * CODE_STD
            out[name] = codes.clamp_(-FP8_MAX, FP8_MAX).to(FP8)
            jitter = 1.0 + 0.1 * (2 * torch.rand(scale_shape(shape), generator=g, device=device) - 1)
            out[name + "_scale_inv"] = jitter * (std / CODE_STD)
        else:
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            out[name] = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * std)
    return out


