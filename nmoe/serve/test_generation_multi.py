"""Every rank generates greedily for its own prompts under the lockstep orchestrator; the tokens
must equal a world-size-1 run of the same prompts, and the embedded tiny model's fixed prompts must
complete correctly. Half of each rank's prompts arrive a few steps late, so ranks go busy and idle
at different times (T=0 steps included).

    torchrun --nproc_per_node=N -m nmoe.serve.test_generation_multi
    env: NMOE_MODEL_PATH (default tiny; an HF checkpoint or an EP shard set), NMOE_EP_PLACEMENT, NMOE_EP_TRANSPORT, NMOE_DEEPEP_LOW_LATENCY
"""

from __future__ import annotations

from nmoe.serve.ep import testing
from nmoe.serve.orchestrator import CollectOutputs, Orchestrator
from nmoe.serve.request import SamplingParams
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

EXTRA_PROMPTS = [
    "The capital of Spain is Madrid. The capital of Germany is",
    "What is the capital of Italy?",
    "Two plus two is four. The largest planet is Jupiter. The color of the sky is",
]
MAX_TOKENS = 8


class LateArrivals(CollectOutputs):
    """Adds `late` requests at iteration `at` (the control plane's place in the loop)."""

    def __init__(self, late: list[tuple[int, list[int]]], at: int, params: SamplingParams):
        super().__init__()
        self.late, self.at, self.params = late, at, params

    def before_step(self, orch) -> None:
        if orch.iterations == self.at:
            for rid, ids in self.late:
                orch.engine.add_request(ids, self.params, rid=rid)


def scenario(ctx):
    from nmoe.serve.llm import LLM

    engine = testing.build_engine(ctx, max_batch_size=8)
    tok = engine.tokenizer
    prompts = [p for p, _ in FIXED_PROMPTS] + EXTRA_PROMPTS
    mine = [i for i in range(len(prompts)) if i % ctx.world_size == ctx.rank]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    early, late = mine[: (len(mine) + 1) // 2], mine[(len(mine) + 1) // 2:]
    for i in early:
        engine.add_request(tok.encode(prompts[i]), params, rid=i)
    hooks = LateArrivals([(i, tok.encode(prompts[i])) for i in late], at=3, params=params)
    orch = Orchestrator(engine, ctx, hooks)
    orch.run()

    ref_path = testing.reference_model_path(engine)
    ref = LLM(ref_path, **testing.small_serve_kwargs(ckpt=ref_path, max_batch_size=8))
    want = ref.generate([prompts[i] for i in mine], params) if mine else []
    problems = []
    for i, w in zip(mine, want):
        got = hooks.outputs.get(i)
        if got is None:
            problems.append(f"prompt {i}: no output")
        elif got.token_ids != w.token_ids:
            problems.append(f"prompt {i} {prompts[i]!r}: tokens {got.token_ids} != world-size-1 {w.token_ids}")
        elif testing.is_tiny(engine) and i < len(FIXED_PROMPTS) and not got.text.startswith(FIXED_PROMPTS[i][1]):
            problems.append(f"prompt {i} {prompts[i]!r}: {got.text!r} does not start with {FIXED_PROMPTS[i][1]!r}")
    if not testing.all_ok(ctx, not problems):
        raise AssertionError("; ".join(problems) or "another rank's generations differ")
    return {"prompts": len(mine), "steps": orch.step, "transport": orch.transport.name}


if __name__ == "__main__":
    testing.main(scenario, "test_generation_multi")
