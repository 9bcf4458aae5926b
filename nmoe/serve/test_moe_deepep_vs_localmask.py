"""One MoE layer with real loaded weights through the EP transport vs the local-mask reference
(every rank runs its own experts on all ranks' tokens, masked to the (token, k) pairs routed to
them, then an all-reduce sums the ranks' parts). Both receive layouts; even and uneven T per rank.

    torchrun --nproc_per_node=N -m nmoe.serve.test_moe_deepep_vs_localmask
    env: NMOE_MODEL_PATH, NMOE_TEST_TOKENS (per rank, default 256), NMOE_TEST_TOL (default 1e-4),
         NMOE_EP_TRANSPORT (a2a | deepep), NMOE_EP_PLACEMENT
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nmoe.serve.env import ENV
from nmoe.serve.ep import attach, testing


def local_mask_reference(ctx, mlp, xs: list[torch.Tensor]) -> torch.Tensor:
    """The MoE of this rank's rows `xs[rank]`, computed without dispatch: every rank runs its own
    experts on all ranks' rows `xs`, masked to the (token, k) pairs routed to them; an all-reduce sums."""
    x = xs[ctx.rank]
    sizes = [len(r) for r in xs]
    xs = torch.cat(xs)
    weights, ids = mlp.route(xs)
    local = {g: j for j, g in enumerate(mlp.experts.expert_ids)}
    tok, kk = (torch.tensor([g in local for g in ids.flatten().tolist()], device=x.device)
               .view_as(ids).nonzero(as_tuple=True))
    local_ids = torch.tensor([local[g] for g in ids[tok, kk].tolist()], dtype=torch.long, device=x.device)
    part = torch.zeros_like(xs).index_add_(0, tok, mlp.experts(xs[tok], local_ids, weights[tok, kk]))
    if ctx.distributed:
        dist.all_reduce(part, group=ctx.tensor_group)
    start = sum(sizes[: ctx.rank])
    y = part[start : start + x.shape[0]]
    return y + mlp.shared_experts(x) if mlp.shared_experts is not None else y


def scenario(ctx):
    model = testing.build_engine(ctx, num_pages=1).model
    layer = next(i for i in range(model.cfg.num_hidden_layers) if model.cfg.is_moe_layer(i))
    mlp = model.layers[layer].mlp
    n_tok, tol = ENV.test_tokens, ENV.test_tol
    results = {}
    for layout in ("0", "1"):
        transport = testing.transport_for(ctx, model.cfg.n_routed_experts, n_tok, low_latency=layout)
        attach(model, transport)
        worst = 0.0
        for case, sizes in (("even", [n_tok] * ctx.world_size),
                            ("uneven", [max(0, n_tok - 97 * r) for r in range(ctx.world_size)])):
            xs = [torch.randn(n, model.cfg.hidden_size, generator=torch.Generator().manual_seed(31 * r + len(case)))
                  .to(ctx.device) for r, n in enumerate(sizes)]  # every rank's rows, on every rank
            with torch.no_grad():
                got = mlp(xs[ctx.rank])
                want = local_mask_reference(ctx, mlp, xs)
            worst = max(worst, testing.check_close(
                f"rank {ctx.rank} layer {layer} {case} T={sizes} low_latency={layout}", got, want, tol))
        results[f"max_diff_ll{layout}"] = testing.all_max(ctx, worst)
    results.update(layer=layer, tokens=n_tok, transport=transport.name)
    return results


if __name__ == "__main__":
    testing.main(scenario, "test_moe_deepep_vs_localmask")
