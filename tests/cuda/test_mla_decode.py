"""torch.ops.nmoe.mla_decode_paged against an fp32 reference (skipped without CUDA or nmoe._C).

Every case poisons the cache's unused slots with NaN, pads the block table with huge page ids and
poisons the memory the outputs are allocated from, so an element the kernel reads or leaves
unwritten by mistake shows up as NaN. Criteria, per case (rows of length > 0):
  lse:  |lse - ref| <= 1e-3 (fp32 scores from bf16 inputs)
  out:  |out - ref| <= 1e-2 + 2e-2 |ref| elementwise (bf16 output, P rounded to bf16);
        per (sequence, head) cosine >= 0.999; global 1 - 2<x,y> / (|x|^2 + |y|^2) <= 1e-4
  length 0: out exactly 0, lse = -inf.

The wgmma kernel (variant 1: deferred schedule, 2: eager, 3: deferred with a proxy fence after
each wait for cp.async data, a diagnostic, 4: the seesaw schedule, the two warpgroups taking
alternate tiles; 64 heads per CTA, H >= 64) runs the same matrix forced on through the op's
`variant` argument; it must also be bitwise deterministic (a missing barrier
shows up as run-to-run differences) and selected by NMOE_MLA_WGMMA only where it applies. Its
lazy rescale (NMOE_MLA_LAZY, default on) is what every case runs; test_wgmma_lazy_rescale runs
both settings on scores whose maxima move past the slack.
scripts/gpu_check_mla.sh runs these on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from nmoe.serve.ops.attention import mla_decode_paged_ref

R, D = 512, 64
HUGE_PAGE = 2**31 - 1
DEFAULT_WGMMA = 4  # what a call without a variant runs at H >= 64: the seesaw schedule
WGMMA = [1, 2, 3, 4]  # the wgmma kernel: deferred, eager, deferred + consumer proxy fences, seesaw


def _ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        import nmoe._C  # noqa: F401
    except ImportError:
        pass
    if not hasattr(torch.ops.nmoe, "mla_decode_paged"):
        pytest.skip("nmoe._C (CUDA kernels) is not built")
    return torch.ops.nmoe


def make_case(lengths, heads, page_size, seed=0, q_padded=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lengths)
    pages_per = [-(-n // page_size) for n in lengths]
    max_pages = max(pages_per + [1]) + 2
    num_pages = sum(pages_per) + 5
    cache = torch.full((num_pages, page_size, R + D), float("nan"), device="cuda", dtype=torch.bfloat16)
    table = torch.full((b, max_pages), HUGE_PAGE, dtype=torch.int32, device="cuda")
    perm = torch.randperm(num_pages, device="cuda", generator=g)
    used = 0
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        pages = perm[used : used + pages_per[i]]
        used += pages_per[i]
        table[i, : pages_per[i]] = pages.int()
        kv = torch.randn(pages_per[i] * page_size, R + D, device="cuda", generator=g).bfloat16()
        kv[n:] = float("nan")  # the tail of the last page stays poisoned
        cache[pages] = kv.view(-1, page_size, R + D)
    if q_padded:
        q = torch.randn(b, heads, R + D + 64, device="cuda", generator=g).bfloat16()[..., : R + D]
    else:
        q = torch.randn(b, heads, R + D, device="cuda", generator=g).bfloat16()
    return q, cache, table, torch.tensor(lengths, dtype=torch.int32, device="cuda")


def poison_allocator(nbytes: int):
    """Fill (and free) a block so the op's outputs come from NaN-filled memory."""
    torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device="cuda").fill_(float("nan"))


def run_op(ops, q, cache, table, seq_lens, scale, variant=None):
    if variant is None:
        return ops.mla_decode_paged(q, cache, table, seq_lens, scale)
    return ops.mla_decode_paged(q, cache, table, seq_lens, scale, variant)


def check(ops, lengths, heads, page_size, seed=0, q_padded=False, variant=None):
    q, cache, table, seq_lens = make_case(lengths, heads, page_size, seed, q_padded)
    check_case(ops, q, cache, table, seq_lens, 192**-0.5, variant)


def check_case(ops, q, cache, table, seq_lens, scale, variant=None):
    lengths, heads = seq_lens.tolist(), q.shape[1]
    poison_allocator(len(lengths) * heads * (R * 2 + 4) * 2)
    out, lse = run_op(ops, q, cache, table, seq_lens, scale, variant)
    torch.cuda.synchronize()
    # The kernel reads the poisoned cache; the reference gets the poison zeroed (valid slots are never
    # NaN), so a NaN in the output can only come from the kernel reading a slot it must not.
    ref_out, ref_lse = mla_decode_paged_ref(
        q.float(), cache.float().nan_to_num(0.0), table, seq_lens, scale, R
    )
    assert out.shape == (len(lengths), heads, R) and out.dtype == torch.bfloat16
    assert lse.shape == (len(lengths), heads) and lse.dtype == torch.float32
    lens = seq_lens.long()
    empty = lens == 0
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))
    o, r = out[~empty].float(), ref_out[~empty]
    if o.numel() == 0:
        return
    assert torch.isfinite(o).all() and torch.isfinite(lse[~empty]).all()
    lse_err = (lse[~empty] - ref_lse[~empty]).abs().max().item()
    assert lse_err <= 1e-3, f"lse error {lse_err}"
    bad = (o - r).abs() > 1e-2 + 2e-2 * r.abs()
    assert not bad.any(), f"{int(bad.sum())} elements off, max abs error {(o - r).abs().max().item()}"
    cos = torch.nn.functional.cosine_similarity(o, r, dim=-1)
    assert cos.min().item() >= 0.999, f"min cosine {cos.min().item()}"
    diff = 1 - 2 * (o.double() * r.double()).sum() / (o.double().square().sum() + r.double().square().sum())
    assert diff.item() <= 1e-4, f"global diff {diff.item()}"


@pytest.mark.parametrize("heads", [1, 16, 20, 63, 128])
@pytest.mark.parametrize("page_size", [16, 48, 64, 128])
def test_mixed_lengths(heads, page_size):
    ops = _ops()
    lengths = [0, 1, 7, 63, 64, 65, 200, 1000, 2049, 0, 5000]
    for variant in (None, 0) if heads >= 64 else (None,):  # the default (wgmma at 64+) and mma.sync
        check(ops, lengths, heads, page_size, seed=heads * 131 + page_size, variant=variant)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_single_and_small_batches_split_kv(batch):
    ops = _ops()
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 32768, (batch,), generator=g).tolist()
    lengths[0] = 32768
    check(ops, lengths, 128, 64, seed=batch)
    check(ops, lengths, 16, 64, seed=batch + 100)


def test_batch_256_lengths_to_32k():
    ops = _ops()
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 4096, (256,), generator=g)
    lengths[::37] = 0
    lengths[5::41] = torch.randint(8192, 32769, (len(lengths[5::41]),), generator=g)
    check(ops, lengths.tolist(), 128, 64, seed=7)


def test_batch_256_short_16_heads():
    ops = _ops()
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(0, 300, (256,), generator=g).tolist()
    check(ops, lengths, 16, 16, seed=8)


def test_all_empty_and_strided_q():
    ops = _ops()
    check(ops, [0, 0, 0], 128, 64)
    check(ops, [10, 300, 0, 4000], 63, 64, q_padded=True)


def test_rejects_bad_inputs():
    ops = _ops()
    q, cache, table, seq_lens = make_case([5], 16, 64)
    with pytest.raises(RuntimeError, match="q must be"):
        ops.mla_decode_paged(q.float(), cache, table, seq_lens, 0.1)
    with pytest.raises(RuntimeError, match="block_table"):
        ops.mla_decode_paged(q, cache, table.long(), seq_lens, 0.1)
    with pytest.raises(RuntimeError, match="cache must be"):
        ops.mla_decode_paged(q, cache[..., :512], table, seq_lens, 0.1)


# ---- the wgmma kernel, each variant forced through `variant` (the default above: seesaw wgmma at H >= 64) ----


@pytest.mark.parametrize("variant", WGMMA)
def test_wgmma_smoke(variant):
    """A small case first, so a hang or a fault shows up before the long matrix."""
    ops = _ops()
    check(ops, [1, 65, 200, 1000], 128, 64, seed=3, variant=variant)


@pytest.mark.parametrize("variant", WGMMA)
@pytest.mark.parametrize("heads", [64, 100, 128])
@pytest.mark.parametrize("page_size", [16, 17, 48, 64, 100, 128])
def test_wgmma_mixed_lengths(heads, page_size, variant):
    ops = _ops()
    lengths = [0, 1, 7, 63, 64, 65, 200, 1000, 2049, 0, 5000]
    check(ops, lengths, heads, page_size, seed=heads * 131 + page_size, variant=variant)


@pytest.mark.parametrize("variant", WGMMA)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_wgmma_split_kv(batch, variant):
    ops = _ops()
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 32768, (batch,), generator=g).tolist()
    lengths[0] = 32768
    check(ops, lengths, 128, 64, seed=batch, variant=variant)
    check(ops, lengths, 64, 48, seed=batch + 50, variant=variant)


@pytest.mark.parametrize("variant", WGMMA)
def test_wgmma_batch_256_lengths_to_32k(variant):
    ops = _ops()
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 4096, (256,), generator=g)
    lengths[::37] = 0
    lengths[5::41] = torch.randint(8192, 32769, (len(lengths[5::41]),), generator=g)
    check(ops, lengths.tolist(), 128, 64, seed=7, variant=variant)


@pytest.mark.parametrize("variant", WGMMA)
def test_wgmma_all_empty_and_strided_q(variant):
    ops = _ops()
    check(ops, [0, 0, 0], 128, 64, variant=variant)
    check(ops, [10, 300, 0, 4000], 100, 64, q_padded=True, variant=variant)


@pytest.mark.parametrize("variant", WGMMA)
def test_wgmma_deterministic(variant):
    """Same inputs, same bits, every time: a race on the shared-memory stages or on P would not be."""
    ops = _ops()
    for lengths, page in (([3000, 64, 1, 777], 64), ([40000], 16)):
        q, cache, table, seq_lens = make_case(lengths, 128, page, seed=11)
        first = run_op(ops, q, cache, table, seq_lens, 0.1, variant)
        for _ in range(4):
            again = run_op(ops, q, cache, table, seq_lens, 0.1, variant)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_wgmma_env_selection(monkeypatch):
    """The default call: the seesaw wgmma kernel where H >= 64, or the one NMOE_MLA_WGMMA names."""
    ops = _ops()
    lengths = [500, 3000]
    q, cache, table, seq_lens = make_case(lengths, 128, 64, seed=5)
    q16, cache16, table16, seq_lens16 = make_case(lengths, 16, 64, seed=6)
    ref = {v: run_op(ops, q, cache, table, seq_lens, 0.1, v) for v in (0, 1, 2, 3, 4)}
    ref16 = run_op(ops, q16, cache16, table16, seq_lens16, 0.1, 0)
    for env, v in ((None, DEFAULT_WGMMA), ("0", 0), ("1", 1), ("2", 2), ("3", 3), ("4", 4)):
        if env is None:
            monkeypatch.delenv("NMOE_MLA_WGMMA", raising=False)
        else:
            monkeypatch.setenv("NMOE_MLA_WGMMA", env)
        out, lse = run_op(ops, q, cache, table, seq_lens, 0.1)
        assert torch.equal(out, ref[v][0]) and torch.equal(lse, ref[v][1]), f"NMOE_MLA_WGMMA={env}"
        out16, lse16 = run_op(ops, q16, cache16, table16, seq_lens16, 0.1)  # 16 heads: always mma.sync
        assert torch.equal(out16, ref16[0]) and torch.equal(lse16, ref16[1]), (
            f"NMOE_MLA_WGMMA={env}, 16 heads"
        )
    monkeypatch.setenv("NMOE_MLA_WGMMA", "yes")
    with pytest.raises(RuntimeError, match="NMOE_MLA_WGMMA must be"):
        run_op(ops, q, cache, table, seq_lens, 0.1)


@pytest.mark.parametrize("variant", [2, 4])
@pytest.mark.parametrize("heads,page_size", [(128, 64), (100, 17)])
def test_wgmma_paired_splits(monkeypatch, heads, page_size, variant):
    """32 sequences of 2 head blocks fill 132 SMs with 2 splits: the eager and the seesaw kernels run
    them as 2-CTA clusters that merge through distributed shared memory. It must pass the reference
    criteria (sequences whose second split is empty, length <= 64, and empty ones included), repeat bit for
    bit, and agree with the partial outputs + combine kernel (NMOE_MLA_PAIR=0). That agreement is
    to the last bits, not exact: ptxas contracts a few multiply-adds of the tile loop differently
    in the two instantiations (measured on the H200: ~10% of the lse values 1 ulp apart, ~0.005% of
    the outputs 1 bf16 ulp apart, sequences of length 63 included, which the merge does not touch).
    A flipped rounding of one P element moves an output by about an ulp of its row's largest
    outputs, which is many ulps of an output that happens to be near zero (with the lazy rescale:
    118 of 2.1M outputs apart, one of them by 272 of its own ulps), so differences are counted in
    ulps of the row's largest output. A mistake in the exchange (a wrong slot, a missing barrier)
    moves most outputs, not a few."""
    ops = _ops()
    lengths = [0, 1, 63, 64, 65, 127, 128, 129, 2000, 1999, 257] + [2000 - 37 * i for i in range(21)]
    q, cache, table, seq_lens = make_case(lengths, heads, page_size, seed=heads)
    monkeypatch.delenv("NMOE_MLA_PAIR", raising=False)
    paired = run_op(ops, q, cache, table, seq_lens, 0.1, variant)
    for _ in range(3):
        again = run_op(ops, q, cache, table, seq_lens, 0.1, variant)
        assert torch.equal(again[0], paired[0]) and torch.equal(again[1], paired[1])
    check(ops, lengths, heads, page_size, seed=heads, variant=variant)
    monkeypatch.setenv("NMOE_MLA_PAIR", "0")
    unpaired = run_op(ops, q, cache, table, seq_lens, 0.1, variant)
    lse, lse_ref = paired[1], unpaired[1]
    assert torch.equal(lse.isinf(), lse_ref.isinf()) and torch.equal(lse[lse.isinf()], lse_ref[lse.isinf()])
    finite = lse.isfinite()
    lse_err = ((lse - lse_ref)[finite].abs() / lse_ref[finite].abs().clamp_min(1.0)).max().item()
    assert lse_err <= 1e-6, f"lse differs by {lse_err} (relative)"
    out, out_ref = paired[0].float(), unpaired[0].float()
    differ = out != out_ref
    assert differ.float().mean().item() <= 1e-3, f"{int(differ.sum())} of {out.numel()} outputs differ"
    row_max = out_ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    step = 2.0 ** (torch.floor(torch.log2(row_max)) - 7)  # one bf16 ulp of the row's largest output
    ulps = ((out - out_ref).abs() / step)[differ]
    assert ulps.numel() == 0 or ulps.max().item() <= 16, f"outputs up to {ulps.max().item()} row ulps apart"
    monkeypatch.setenv("NMOE_MLA_PAIR", "yes")
    with pytest.raises(RuntimeError, match="NMOE_MLA_PAIR must be"):
        run_op(ops, q, cache, table, seq_lens, 0.1, variant)


def test_wgmma_lazy_rescale(monkeypatch):
    """The wgmma kernels keep a row's running max while a tile's exceeds it by at most 8 (base 2) and
    rescale O only when some row's max moves (NMOE_MLA_LAZY=1, the default). Rope keys that grow tile
    by tile (maxima that jump past the slack and maxima that stay within it: a CPU model of the
    kernel on this data moved about 2,800 row maxima and kept about 100,000) while V (the latent)
    keeps unit scale, so that the criteria's absolute term means what it does elsewhere; a batch in
    which the paired merge and the combine kernel both run: the reference criteria with the slack
    and without it (NMOE_MLA_LAZY=0, the exact online max), for the eager and deferred schedules."""
    ops = _ops()
    lengths = [2000, 1999, 700, 64, 65, 1] + [2000 - 61 * i for i in range(26)]
    q, cache, table, seq_lens = make_case(lengths, 128, 64, seed=7)
    for i, n in enumerate(lengths):  # rope key norms rising 12x over 2000 tokens
        for t0 in range(0, n, 64):
            page, slot = table[i, t0 // 64], slice(0, min(64, n - t0))
            cache[page, slot, R:] *= 1.0 + 11.0 * t0 / 2000
    for lazy in ("1", "0"):
        monkeypatch.setenv("NMOE_MLA_LAZY", lazy)
        for variant in (2, 1, 4):
            check_case(ops, q, cache, table, seq_lens, 192**-0.5, variant)
    monkeypatch.setenv("NMOE_MLA_LAZY", "2")
    with pytest.raises(RuntimeError, match="NMOE_MLA_LAZY must be"):
        run_op(ops, q, cache, table, seq_lens, 0.1, 2)


def test_wgmma_rejects_few_heads_and_bad_variant():
    ops = _ops()
    q, cache, table, seq_lens = make_case([5], 16, 64)
    with pytest.raises(RuntimeError, match="at least 64 heads"):
        ops.mla_decode_paged(q, cache, table, seq_lens, 0.1, 1)
    with pytest.raises(RuntimeError, match="variant must be"):
        ops.mla_decode_paged(q, cache, table, seq_lens, 0.1, 5)
