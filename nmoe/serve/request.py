"""Requests: sampling parameters (vLLM's names), per-request state, and the outputs returned."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OutputMode(str, enum.Enum):
    TOKENS = "tokens"
    LOGPROBS = "logprobs"
    TOPK_LOGPROBS = "topk_logprobs"
    LOGITS = "logits"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    logprobs: bool | int | None = None  # True/0: the chosen token's logprob; k > 0: also the top k
    ignore_eos: bool = False
    logprobs_mode: str = "raw"  # "raw" (model distribution) or "processed" (after the transforms)
    output_mode: OutputMode | str | None = None  # None: TOKENS, or LOGPROBS/TOPK when logprobs is set
    solo_forward: bool = False  # forward this request's tokens in a batch of their own (fixed batching)
    profile: str | None = None  # a name from nmoe.serve.profiles.PROFILES; sets the fields above

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.profile is not None:
            from nmoe.serve.profiles import enforce

            enforce(self)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, int | float) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer below 2^31, got {self.top_k!r}")
        if not (isinstance(self.min_p, int | float) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
                raise ValueError(f"logprobs must be a bool or an integer in [0, 20], got {self.logprobs!r}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {self.logprobs_mode!r}")
        if self.output_mode is not None:
            self.output_mode = OutputMode(self.output_mode)

    @property
    def num_top_logprobs(self) -> int:
        if isinstance(self.logprobs, bool) or self.logprobs is None:
            return 0
        return self.logprobs

    @property
    def mode(self) -> OutputMode:
        if self.output_mode is not None:
            return OutputMode(self.output_mode)
        if self.num_top_logprobs:
            return OutputMode.TOPK_LOGPROBS
        if self.logprobs is not None and self.logprobs is not False:
            return OutputMode.LOGPROBS
        return OutputMode.TOKENS


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error" | None while running
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    logits: object | None = None  # torch.Tensor [T, vocab] fp32 in LOGITS mode
    error: str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """Engine-side state of one request."""

    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    logits: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    forced: list[int] | None = None  # teacher forcing: the tokens to score instead of sampling
    seq: object = None  # the scheduler's Sequence
    detok: object = None  # IncrementalDetokenizer
    stop_scan_from: int = 0

    def output(self) -> RequestOutput:
        mode = self.params.mode
        logits = None
        if mode is OutputMode.LOGITS and self.logits:
            import torch

            logits = torch.stack(self.logits)
        return RequestOutput(
            request_id=self.rid,
            prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids),
            text=self.text,
            finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if mode is not OutputMode.TOKENS else None,
            top_logprobs=list(self.top_logprobs) if self.params.num_top_logprobs else None,
            logits=logits,
            error=self.error,
            num_cached_tokens=getattr(self.seq, "num_cached_tokens", 0) if self.seq is not None else 0,
        )
