"""nmoe EP shards: one safetensors file per rank, that rank's routed experts stacked.

Layout of `<name>-ep{N}-tp1/`:
    manifest.json                    format, format_version, world_size, placement, source,
                                     n_routed_experts, files[r], experts[r] (global ids, stack order)
    rank-{r:05d}-of-{N:05d}.safetensors
        every dense / attention / shared-expert / router tensor under its HF name (FP8 + scales as
        in the release), and per MoE layer and projection the rank's experts stacked:
        `model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight` `[E_local, out, in]` (+ `_scale_inv`
        `[E_local, ceil(out/128), ceil(in/128)]`), row j = expert `experts[r][j]`
    config.json, tokenizer files     copied from the source

`load_rank_weights` returns exactly what `ckpt.load_weights(hf_dir, cfg, experts=...)` returns for
that rank, so the engine loads either layout the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmoe.serve.ckpt import CheckpointError, HFCheckpoint, copy_tokenizer, load_config, model_specs
from nmoe.serve.dist import RankInfo

MANIFEST = "manifest.json"
FORMAT = "nmoe-ep-shards"
FORMAT_VERSION = 1
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def is_shard_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def _expert_name(layer: int, expert: int | None, proj: str) -> str:
    """HF name of one expert's projection; `expert=None`: the stacked name in a shard file."""
    mid = "experts" if expert is None else f"experts.{expert}"
    return f"model.layers.{layer}.mlp.{mid}.{proj}.weight"


def _moe_layers(cfg) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


# ------------------------------------------------------------------------------------------------
# Converting
# ------------------------------------------------------------------------------------------------


def convert(hf_dir: str, out_dir: str, world_size: int, placement: str = "contiguous", progress: bool = True) -> dict:
    """Write the EP shard set of the HF-layout checkpoint `hf_dir` for `world_size` ranks; returns the manifest."""
    cfg = load_config(hf_dir)
    src = HFCheckpoint(hf_dir)
    experts = [RankInfo(r, world_size, placement).local_experts(cfg.n_routed_experts) for r in range(world_size)]
    os.makedirs(out_dir, exist_ok=True)
    shared = model_specs(cfg, experts=[])  # everything but the routed experts
    routed = model_specs(cfg, experts=[0])
    for r in range(world_size):
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in shared.items():
            tensors.update(src.read(name, spec))
        for layer in _moe_layers(cfg):
            for proj in PROJECTIONS:
                spec = routed[_expert_name(layer, 0, proj)]
                parts = [src.read(_expert_name(layer, e, proj), spec) for e in experts[r]]
                stacked = _expert_name(layer, None, proj)
                tensors[stacked] = torch.stack([p[_expert_name(layer, e, proj)] for p, e in zip(parts, experts[r])])
                if spec.kind == "fp8":
                    scales = [p[_expert_name(layer, e, proj) + "_scale_inv"] for p, e in zip(parts, experts[r])]
                    tensors[stacked + "_scale_inv"] = torch.stack(scales)
        path = os.path.join(out_dir, rank_file(r, world_size))
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
        if progress:
            print(f"wrote {path} ({len(experts[r])} experts, {len(tensors)} tensors)", file=sys.stderr)
    shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, "config.json"))
    copy_tokenizer(hf_dir, out_dir)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "world_size": world_size,
        "placement": placement,
        "source": os.path.abspath(hf_dir),
        "n_routed_experts": cfg.n_routed_experts,
        "files": [rank_file(r, world_size) for r in range(world_size)],
        "experts": experts,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict:
    p = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(p) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read the EP shard manifest: {e}") from e
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: format {m.get('format')!r} version {m.get('format_version')!r}; this nmoe reads "
            f"{FORMAT!r} version {FORMAT_VERSION}"
        )
    return m


class _RankShard(HFCheckpoint):
    """One rank's shard file read through `HFCheckpoint`'s checks: per-expert names map to rows of
    the stacked tensors."""

    def __init__(self, path: str, file: str, experts: list[int]):
        self.path = path
        full = os.path.join(path, file)
        if not os.path.exists(full):
            raise CheckpointError(f"{full}: shard file is missing")
        self._f = safe_open(full, "pt")
        self._rows: dict[str, tuple[str, int]] = {}
        self.weight_map = {k: file for k in self._f.keys()}
        for stacked in [k for k in self.weight_map if ".mlp.experts." in k]:
            prefix, rest = stacked.split(".mlp.experts.")
            for j, e in enumerate(experts):
                self._rows[f"{prefix}.mlp.experts.{e}.{rest}"] = (stacked, j)
                self.weight_map[f"{prefix}.mlp.experts.{e}.{rest}"] = file

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing from {next(iter(self.weight_map.values()))}")
        if name in self._rows:
            stacked, j = self._rows[name]
            return self._f.get_slice(stacked)[j]
        return self._f.get_tensor(name)


def load_rank_weights(path: str | os.PathLike, cfg, rank_info: RankInfo, progress: bool = True) -> dict[str, torch.Tensor]:
    """This rank's tensors (HF names, routed experts limited to its own) from an EP shard set."""
    path = os.fspath(path)
    m = read_manifest(path)
    if m["world_size"] != rank_info.world_size:
        raise CheckpointError(
            f"{path}: EP shards were written for world size {m['world_size']}, but this job has "
            f"{rank_info.world_size} ranks; convert again with --world-size {rank_info.world_size} or load the HF checkpoint"
        )
    if m["placement"] != rank_info.placement:
        raise CheckpointError(
            f"{path}: EP shards use {m['placement']} expert placement, but this job asks for {rank_info.placement}"
        )
    experts = m["experts"][rank_info.rank]
    want = rank_info.local_experts(cfg.n_routed_experts)
    if experts != want:
        raise CheckpointError(f"{path}: manifest gives rank {rank_info.rank} experts {experts}, expected {want}")
    shard = _RankShard(path, m["files"][rank_info.rank], experts)
    items = model_specs(cfg, experts).items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"loading {os.path.basename(path.rstrip('/'))} rank {rank_info.rank}", unit="tensor",
                     file=sys.stderr)
    out: dict[str, torch.Tensor] = {}
    for name, spec in items:
        out.update(shard.read(name, spec))
    return out
