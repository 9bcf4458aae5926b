"""EP pieces in one process: the transport at world size 1 against the local path, the EP shard
converter and loader, and the orchestrator at world size 1 (generation, fault injection)."""

from __future__ import annotations

import pytest
import torch

from nmoe.serve import ep, shards
from nmoe.serve.ckpt import TINY_DIR, CheckpointError, load_config, load_weights
from nmoe.serve.dist import RankInfo, init_dist
from nmoe.serve.engine import Engine
from nmoe.serve.ep import testing
from nmoe.serve.model import Experts, combine_experts
from nmoe.serve.orchestrator import CollectOutputs, Orchestrator, RankFailure, parse_fault
from nmoe.serve.request import SamplingParams
from nmoe.serve.side_stream import Deferred


@pytest.fixture(scope="module")
def ctx():
    return init_dist()


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("low_latency", ["0", "1"])
@pytest.mark.parametrize("t", [0, 1, 37])
def test_transport_matches_local_experts(ctx, low_latency, t):
    torch.manual_seed(t)
    experts = Experts(24, 16, list(range(8)))
    x = torch.randn(t, 24)
    weights, ids = testing.random_routing(t, 8, 3, torch.Generator().manual_seed(t))
    tok = torch.arange(t).repeat_interleave(3)
    want = torch.zeros_like(x).index_add_(0, tok, experts(x[tok], ids.flatten(), weights.flatten()))
    transport = ep.make_transport(ctx, 8, max_tokens_per_rank=64, low_latency=low_latency)
    assert transport.name == "local"
    assert torch.equal(transport.moe(x, weights, ids, experts), want)
    # the shared experts' output as a side stream's Deferred (what MoE.forward passes on CUDA) is
    # added exactly as the tensor itself is, by the transports and by the local path alike
    add = torch.randn(t, 24)
    with_add = transport.moe(x, weights, ids, experts, add=add)
    assert torch.equal(transport.moe(x, weights, ids, experts, add=Deferred(add, None)), with_add)
    assert torch.equal(combine_experts(experts, x, weights, ids, Deferred(add, None)),
                       combine_experts(experts, x, weights, ids, add))


def test_transport_errors(ctx):
    with pytest.raises(ValueError, match="NMOE_EP_TRANSPORT='nccl'"):
        ep.make_transport(ctx, 8, kind="nccl")
    with pytest.raises(ValueError, match="NMOE_DEEPEP_LOW_LATENCY='2'"):
        ep.make_transport(ctx, 8, low_latency="2")
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="`deep_ep` package"):
            ep.make_transport(ctx, 8, kind="deepep")


def test_local_failure_still_completes_the_call(ctx):
    """A failing expert computation raises after the call's exchanges, and the call is counted."""

    class Broken(Experts):
        def forward(self, x, local_ids, weights):
            raise RuntimeError("expert kernel failed")

    transport = ep.make_transport(ctx, 8)
    x = torch.randn(5, 24)
    weights, ids = testing.random_routing(5, 8, 2, torch.Generator().manual_seed(0))
    transport.begin_forward()
    with pytest.raises(RuntimeError, match="expert kernel failed"):
        transport.moe(x, weights, ids, Broken(24, 16, list(range(8))))
    assert transport.calls == 1


@pytest.mark.parametrize("placement", ["contiguous", "striped"])
def test_shards_roundtrip(tmp_path, placement):
    out = tmp_path / "tiny-ep4-tp1"
    m = shards.convert(TINY_DIR, str(out), 4, placement, progress=False)
    assert shards.is_shard_dir(out) and not shards.is_shard_dir(TINY_DIR)
    assert (m["world_size"], m["placement"], m["format_version"]) == (4, placement, shards.FORMAT_VERSION)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    cfg = load_config(TINY_DIR)
    for r in range(4):
        info = RankInfo(r, 4, placement)
        got = shards.load_rank_weights(out, cfg, info, progress=False)
        want = load_weights(TINY_DIR, cfg, experts=info.local_experts(cfg.n_routed_experts), progress=False)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(_as_bits(got[k]), _as_bits(want[k])), k


def test_shards_mismatch_errors(tmp_path):
    out = tmp_path / "tiny-ep2-tp1"
    shards.convert(TINY_DIR, str(out), 2, progress=False)
    cfg = load_config(TINY_DIR)
    with pytest.raises(CheckpointError, match="world size 2, but this job has 8 ranks"):
        shards.load_rank_weights(out, cfg, RankInfo(0, 8), progress=False)
    with pytest.raises(CheckpointError, match="contiguous expert placement"):
        shards.load_rank_weights(out, cfg, RankInfo(0, 2, "striped"), progress=False)
    (out / shards.rank_file(1, 2)).unlink()
    with pytest.raises(CheckpointError, match="rank-00001-of-00002.safetensors: shard file is missing"):
        shards.load_rank_weights(out, cfg, RankInfo(1, 2), progress=False)


def test_engine_from_shards(tmp_path):
    out = tmp_path / "tiny-ep2-tp1"
    shards.convert(TINY_DIR, str(out), 2, "striped", progress=False)
    cfg = load_config(out)
    info = RankInfo(1, 2, "striped")
    from nmoe.serve.config import ServeConfig

    engine = Engine(ServeConfig(ckpt=str(out), num_pages=4), rank=info,
                    weights=shards.load_rank_weights(out, cfg, info, progress=False))
    assert engine.model.layers[1].mlp.experts.expert_ids == list(range(1, 16, 2))


def _engine(**kw):
    from nmoe.serve.config import ServeConfig

    return Engine(ServeConfig(**testing.small_serve_kwargs(**kw)))


def test_orchestrator_world_size_1(ctx):
    from nmoe.serve.llm import LLM

    engine = _engine(ckpt="tiny")
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = ["The capital of France is", "Two plus two is"]
    for i, p in enumerate(prompts):
        engine.add_request(engine.tokenizer.encode(p), params, rid=i)
    hooks = CollectOutputs()
    orch = Orchestrator(engine, ctx, hooks, fault="")
    orch.run()
    assert orch.transport.name == "local" and not engine.has_work()
    want = LLM("tiny", **testing.small_serve_kwargs(ckpt="tiny")).generate(prompts, params)
    assert [hooks.outputs[i].token_ids for i in range(2)] == [w.token_ids for w in want]


def test_orchestrator_fault_injection_world_size_1(ctx):
    engine = _engine(ckpt="tiny")
    engine.add_request(engine.tokenizer.encode("The capital of France is"), SamplingParams(max_tokens=6), rid=0)
    hooks = CollectOutputs()
    with pytest.raises(RankFailure, match=r"rank 0 failed at step 2: FaultInjected"):
        Orchestrator(engine, ctx, hooks, fault="0:2").run()
    out = hooks.outputs[0]
    assert out.finish_reason == "error" and "rank 0 failed at step 2" in out.error


def test_parse_fault():
    assert parse_fault("") is None and parse_fault("3:17") == (3, 17)
    with pytest.raises(ValueError, match="NMOE_FAULT_INJECT='x'"):
        parse_fault("x")


def test_orchestrator_hook_failure_stops(ctx):
    class Broken(CollectOutputs):
        def before_step(self, orch):
            if orch.iterations == 1:
                raise KeyError("control plane lost a request")

    engine = _engine(ckpt="tiny")
    engine.add_request(engine.tokenizer.encode("The capital of Japan is"), SamplingParams(max_tokens=6), rid=3)
    hooks = Broken()
    with pytest.raises(RankFailure, match="rank 0 failed at step 1: KeyError"):
        Orchestrator(engine, ctx, hooks, fault="").run()
    assert hooks.outputs[3].finish_reason == "error"


def test_attach_checks_placement(ctx):
    from nmoe.serve.model import DeepseekV3

    model = DeepseekV3(load_config(TINY_DIR), RankInfo(0, 2, "striped").local_experts(16))
    t = ep.make_transport(ctx, 16)  # world size 1: this rank holds every expert
    with pytest.raises(ValueError, match="placement gives it"):
        ep.attach(model, t)


def test_world_size_must_divide_experts():
    from nmoe.serve.dist import DistContext

    with pytest.raises(ValueError, match="world_size 3 does not divide n_routed_experts 16"):
        ep.make_transport(DistContext(0, 3, torch.device("cpu"), None, None), 16)
    with pytest.raises(ValueError, match="world_size 3 does not divide n_routed_experts 16"):
        from nmoe.serve.config import ServeConfig

        Engine(ServeConfig(**testing.small_serve_kwargs(ckpt="tiny")), rank=RankInfo(0, 3))
