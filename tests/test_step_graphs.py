"""The CUDA-graph step runner's static path, run eagerly on CPU (`capture=False`): a step whose
rows come in any order (a prefill chunk before a decode row here) gives the same logits and cache
as the ordinary forward, and `fits` admits exactly the shapes it has buckets for."""

import torch

from nmoe.serve.config import ServeConfig
from nmoe.serve.engine import Engine
from nmoe.serve.model import AttnBatch, lower_right_causal_mask
from nmoe.serve.step_graphs import StepGraphs, graph_buckets, prefill_buckets

PAGE = 16


def _batch(positions, out_loc, table, lens, q_lens, caches) -> AttnBatch:
    return AttnBatch(positions=torch.tensor(positions), out_loc=torch.tensor(out_loc),
                     block_table=torch.tensor(table, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
                     q_lens=q_lens, kv_caches=caches, seq_lens_host=list(lens))


def test_static_step_matches_the_eager_forward(tiny_random_dir):
    eng = Engine(ServeConfig(ckpt=tiny_random_dir, num_pages=8, page_size=PAGE, max_seq_len=64, max_batch_size=4))
    model, caches = eng.model, eng.kv_caches
    g = torch.Generator().manual_seed(5)
    y_prompt = torch.randint(2, 500, (7,), generator=g)
    with torch.no_grad():  # sequence Y: 7 tokens already cached in pages 0 and 1
        model(y_prompt, _batch(list(range(7)), list(range(7)), [[0, 1]], [7], [7], caches))
    static_caches = [c.clone() for c in caches]
    # the step: sequence X's first 5 tokens (page 2), then Y's next token, in that order
    ids = torch.cat([torch.randint(2, 500, (5,), generator=g), torch.tensor([42])])
    positions, out_loc = [0, 1, 2, 3, 4, 7], [32, 33, 34, 35, 36, 7]
    table, lens, q_lens = [[2, 0], [0, 1]], [5, 8], [5, 1]
    with torch.no_grad():
        want = model.logits(model(ids, _batch(positions, out_loc, table, lens, q_lens, caches)))
        runner = StepGraphs(model, static_caches, max_batch_size=4, max_pages=4, max_prefill_tokens=16, capture=False)
        got = runner.run(ids, torch.tensor(positions), torch.tensor(out_loc), torch.tensor(table, dtype=torch.int32),
                         torch.tensor(lens, dtype=torch.int32), q_lens=q_lens, rows=[5, 4, 0])
    torch.testing.assert_close(got, want[[5, 4, 0]], rtol=1e-5, atol=1e-5)
    for a, b in zip(caches, static_caches):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the same slots written, no others


def test_fits_and_buckets(tiny_random_dir):
    eng = Engine(ServeConfig(ckpt=tiny_random_dir, num_pages=8, page_size=PAGE, max_seq_len=64, max_batch_size=20))
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert prefill_buckets(0) == [] and prefill_buckets(100) == [16, 32, 64, 100]
    decode_only = StepGraphs(eng.model, eng.kv_caches, 20, 4, capture=False)
    assert decode_only.fits([1] * 20, 4) and not decode_only.fits([1] * 21, 4)
    assert not decode_only.fits([1, 1], 5)  # wider than the static block table
    assert not decode_only.fits([3, 1], 4)  # prefill rows without prefill buckets
    assert not decode_only.fits([], 1)
    mixed = StepGraphs(eng.model, eng.kv_caches, 20, 4, max_prefill_tokens=100, capture=False)
    assert mixed.fits([1, 60, 40], 4) and mixed.fits([100], 4) and not mixed.fits([1, 60, 41], 4)


def test_prefill_masks_built_once_per_step(tiny_random_dir):
    """A step's layers share each prefill chunk's mask (the eager batch's and the graph runner's)."""
    eng = Engine(ServeConfig(ckpt=tiny_random_dir, num_pages=8, page_size=PAGE, max_seq_len=64, max_batch_size=4))
    want = torch.arange(9)[None, :] <= torch.arange(6, 9)[:, None]
    assert torch.equal(lower_right_causal_mask(3, 9, torch.device("cpu")), want)
    assert lower_right_causal_mask(4, 4, torch.device("cpu")) is None  # is_causal
    batch = _batch([0, 1], [0, 1], [[0]], [2], [2], eng.kv_caches)
    runner = StepGraphs(eng.model, eng.kv_caches, 4, 4, max_prefill_tokens=16, capture=False)
    for holder in (batch, runner):
        first = holder.prefill_mask(3, 9)
        assert torch.equal(first, want) and holder.prefill_mask(3, 9) is first
