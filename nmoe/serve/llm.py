"""The offline API, following vLLM's convention: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from nmoe.serve.config import ServeConfig
from nmoe.serve.dist import RankInfo
from nmoe.serve.engine import Engine
from nmoe.serve.request import RequestOutput, SamplingParams


@dataclass
class ScoreOutput:
    """Teacher-forced scores: one logprob per forced token (and top-k rows / logits when asked)."""

    token_ids: list[int]
    logprobs: list[float]
    logprobs_mode: str  # "raw" or "processed"
    top_logprobs: list[list[tuple[int, float]]] | None = None
    logits: object | None = None  # [T, vocab] fp32 in LOGITS mode


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
        return self._run([(ids, sp, None) for ids, sp in zip(encoded, sampling_params)])

    def score(
        self,
        prompt_ids: list[int] | list[list[int]],
        forced_ids: list[int] | list[list[int]],
        sampling_params: SamplingParams | None = None,
        logprobs_mode: str | None = None,
    ) -> ScoreOutput | list[ScoreOutput]:
        """Teacher forcing: the logprob of each forced token after the prompt.

        Without `sampling_params` the raw model distribution is scored; with them, the distribution
        sampling would use (temperature, top-k, top-p, min-p), i.e. `logprobs_mode="processed"`,
        unless `logprobs_mode` says otherwise. Accepts one prompt or a list (then forced_ids is a list)."""
        single = not prompt_ids or isinstance(prompt_ids[0], int)
        prompts = [prompt_ids] if single else list(prompt_ids)
        forced = [forced_ids] if single else list(forced_ids)
        if len(prompts) != len(forced):
            raise ValueError(f"{len(forced)} forced sequences for {len(prompts)} prompts")
        mode = logprobs_mode or ("raw" if sampling_params is None else "processed")
        base = sampling_params or SamplingParams(temperature=1.0)
        logprobs = base.logprobs if base.num_top_logprobs else True
        params = dataclasses.replace(base, logprobs=logprobs, logprobs_mode=mode, max_tokens=0)
        outs = self._run([(list(p), params, list(f)) for p, f in zip(prompts, forced)])
        scored = [
            ScoreOutput(token_ids=o.token_ids, logprobs=o.logprobs or [], logprobs_mode=mode,
                        top_logprobs=o.top_logprobs, logits=o.logits)
            for o in outs
        ]
        return scored[0] if single else scored

    def _run(self, reqs: list[tuple[list[int], SamplingParams, list[int] | None]]) -> list[RequestOutput]:
        for ids, sp, forced in reqs:
            self.engine.validate(ids, sp, forced)
        rids = [self.engine.add_request(ids, sp, forced_output_ids=forced) for ids, sp, forced in reqs]
        done: dict[int, RequestOutput] = {}
        while len(done) < len(rids):
            self.engine.step()
            for out in self.engine.pop_finished():
                done[out.request_id] = out
        return [done[r] for r in rids]
