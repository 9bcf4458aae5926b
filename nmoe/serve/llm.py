"""The offline API, following vLLM's convention: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from nmoe.serve.config import ServeConfig
from nmoe.serve.engine import Engine, RankInfo
from nmoe.serve.request import RequestOutput, SamplingParams


class LLM:
    """`LLM(model="DIR" or "tiny", device="cpu", **serve_config_fields)`."""

    def __init__(self, model: str = "tiny", rank: RankInfo | None = None, **kwargs):
        kwargs.setdefault("ckpt", model)
        self.config = ServeConfig.from_kwargs(**kwargs)
        self.engine = Engine(self.config, rank=rank)
        self.tokenizer = self.engine.tokenizer

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        encoded = [self.encode_prompt(p) for p in prompts]
        for ids, sp in zip(encoded, sampling_params):
            self.engine.validate(ids, sp)
        rids = [self.engine.add_request(ids, sp) for ids, sp in zip(encoded, sampling_params)]
        done: dict[int, RequestOutput] = {}
        while len(done) < len(rids):
            self.engine.step()
            for out in self.engine.pop_finished():
                done[out.request_id] = out
        return [done[r] for r in rids]
