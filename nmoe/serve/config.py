"""Two configuration layers: the model's (from HF `config.json`) and the server's (CLI flags).

`ModelConfig` mirrors the HF DeepSeek-V3 field names and never infers the model from a dimension.
`ServeConfig` holds runtime knobs; every field is a CLI flag (`--num-pages`) and an `LLM(...)` keyword.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json field is missing, of the wrong type, or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    num_key_value_heads: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None

    # --- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached token per layer in the absorbed MLA cache: latent + rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def weight_block_size(self) -> tuple[int, int] | None:
        if self.quantization_config is None:
            return None
        return tuple(self.quantization_config["weight_block_size"])

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale^2 under YaRN (DeepSeek's release and HF agree)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if _rope_type(rs) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            factor = rs.get("factor", 1.0)
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> ModelConfig:
        """Build from an HF `config.json` (a path to the file, to its folder, or the parsed dict)."""
        where = "config"
        if isinstance(source, dict):
            raw = source
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            if not os.path.exists(path):
                raise ConfigError(f"{path}: no such config file")
            with open(path) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: not valid JSON: {e}") from e
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in raw:
                kwargs[f.name] = raw[f.name]
            elif f.default is dataclasses.MISSING:
                raise ConfigError(f"{where}: required field '{f.name}' is missing")
        cfg = cls(**kwargs)
        cfg.validate(where)
        return cfg

    def to_hf(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            torch_dtype="bfloat16",
            use_cache=True,
        )
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d

    def validate(self, where: str = "config") -> None:
        ints = [
            f.name
            for f in dataclasses.fields(self)
            if f.type in ("int", int) and f.name not in ("first_k_dense_replace", "num_nextn_predict_layers")
        ]
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                if name == "n_shared_experts" and v == 0:
                    continue
                raise ConfigError(f"{where}: field '{name}' must be a positive integer, got {v!r}")
        for name in ("first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}: field '{name}' must be a non-negative integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"{where}: field 'q_lora_rank' must be a positive integer or null")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            raise ConfigError(
                f"{where}: field 'num_key_value_heads' ({self.num_key_value_heads}) must equal "
                f"num_attention_heads ({self.num_attention_heads}) for MLA"
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{where}: field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"{where}: field 'n_group' ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})"
            )
        if not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"{where}: field 'topk_group' ({self.topk_group}) must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2:
            raise ConfigError(f"{where}: field 'n_group' leaves {per_group} expert per group; the router needs 2")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"{where}: field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in "
                f"topk_group groups ({self.topk_group * per_group})"
            )
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"{where}: field 'scoring_func' must be 'sigmoid', got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc",):
            raise ConfigError(f"{where}: field 'topk_method' must be 'noaux_tc', got {self.topk_method!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{where}: field 'hidden_act' must be 'silu', got {self.hidden_act!r}")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                raise ConfigError(f"{where}: field 'rope_scaling' must be an object or null")
            kind = _rope_type(rs)
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"{where}: field 'rope_scaling.type' {kind!r} is not supported (yarn, default)")
        qc = self.quantization_config
        if qc is not None:
            if qc.get("quant_method") != "fp8":
                raise ConfigError(
                    f"{where}: field 'quantization_config.quant_method' {qc.get('quant_method')!r} is not "
                    "supported (only 'fp8')"
                )
            if qc.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"{where}: field 'quantization_config.fmt' {qc.get('fmt')!r} is not supported (e4m3)")
            if list(qc.get("weight_block_size", [])) != [128, 128]:
                raise ConfigError(
                    f"{where}: field 'quantization_config.weight_block_size' {qc.get('weight_block_size')!r} "
                    "is not supported ([128, 128])"
                )
            if qc.get("activation_scheme", "dynamic") != "dynamic":
                raise ConfigError(
                    f"{where}: field 'quantization_config.activation_scheme' {qc.get('activation_scheme')!r} "
                    "is not supported (dynamic)"
                )


def _rope_type(rs: dict) -> str | None:
    return rs.get("type", rs.get("rope_type"))


# ------------------------------------------------------------------------------------------------
# Server configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Runtime knobs. Each field is the CLI flag of the same name (underscores as dashes)."""

    ckpt: str = "tiny"
    attention_type: str = "mla"
    device: str = "cpu"
    kv_cache_dtype: str = "auto"
    weights_format: str = "auto"  # auto: FP8 compute on CUDA for FP8 checkpoints, fp32 otherwise
    num_pages: int = 1024
    page_size: int = 64
    max_seq_len: int = 16384
    max_batch_size: int = 256
    max_prefill_tokens: int = 8192
    chunk_size: int = 2048
    disable_prefix_cache: bool = False
    disable_chunked_prefill: bool = False
    disable_mixed_steps: bool = False  # decode steps and prefill steps never share a forward
    mixed_prefill_tokens: int = 0  # prefill tokens in a step that also decodes (0: max_prefill_tokens)
    disable_cuda_graph: bool = False  # CUDA: launch every step eagerly instead of replaying graphs
    cuda_graph_prefill_tokens: int = 512  # CUDA: steps with at most this many prefill tokens replay graphs
    disable_overlap: bool = False  # CUDA: deliver each step's tokens before scheduling the next
    seed: int = 0
    debug_invariants: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.attention_type != "mla":
            raise ValueError(f"--attention-type {self.attention_type!r} is not supported (mla)")
        for name in ("num_pages", "page_size", "max_seq_len", "max_batch_size", "max_prefill_tokens", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not isinstance(self.mixed_prefill_tokens, int) or self.mixed_prefill_tokens < 0:
            raise ValueError(f"--mixed-prefill-tokens must be 0 (off) or positive, got {self.mixed_prefill_tokens!r}")
        if not isinstance(self.cuda_graph_prefill_tokens, int) or self.cuda_graph_prefill_tokens < 0:
            raise ValueError("--cuda-graph-prefill-tokens must be 0 (pure decode steps only) or positive, "
                             f"got {self.cuda_graph_prefill_tokens!r}")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", default=f.default)
            else:
                typ = int if f.type in ("int", int) else str
                parser.add_argument(flag, type=typ, default=f.default)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServeConfig:
        return cls(**{name: getattr(args, name) for name in cls.fields()})

    @classmethod
    def from_kwargs(cls, **kwargs) -> ServeConfig:
        unknown = sorted(set(kwargs) - set(cls.fields()))
        if unknown:
            raise TypeError(f"unknown ServeConfig field(s): {', '.join(unknown)}; known: {', '.join(cls.fields())}")
        return cls(**kwargs)
