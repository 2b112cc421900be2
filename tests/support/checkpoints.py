"""Synthetic model checkpoints shaped like real ones, so tests catch layout bugs that toy files would hide.

The safetensors checkpoint mixes dtypes, uses shapes whose byte sizes are not 4 KiB multiples, and has
``layers.10`` next to ``layers.2`` so name order differs from numeric order. torch and safetensors are
imported inside the functions: this module must import on machines without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
NUM_LAYERS = 12  # >= 11, so "layers.10" sorts before "layers.2"


def _llama_like_specs(hidden: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype name) of a small llama-like model whose sizes scale with ``hidden``.

    hidden is kept odd, so every row (and thus nearly every tensor) ends off any 4 KiB boundary.
    """
    kv = (hidden // 4) | 1
    ffn = (hidden * 11 // 4) | 1
    vocab = 8 * hidden + 3
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), "bfloat16")]
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,), "float32"),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden), "bfloat16"),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden), "float16"),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden), "int8"),
            (f"{p}.self_attn.v_proj.scale", (kv,), "float32"),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden), "float32"),
            (f"{p}.post_attention_layernorm.weight", (hidden,), "float16"),
            (f"{p}.mlp.gate_proj.weight", (ffn, hidden), "bfloat16"),
            (f"{p}.mlp.up_proj.weight", (ffn, hidden), "bfloat16"),
            (f"{p}.mlp.down_proj.weight", (hidden, ffn), "int8"),
            (f"{p}.mlp.expert_ids", (kv + 2,), "int64"),
        ]
    specs += [
        ("model.norm.weight", (hidden,), "float32"),
        ("lm_head.weight", (vocab, hidden), "float16"),
    ]
    return specs


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int64": 8}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = _ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def _specs_for_budget(total_bytes: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Largest odd hidden size whose model fits in ``total_bytes`` (at least hidden=5)."""
    lo, hi = 2, 1 << 16  # hidden = 2*k + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(_nbytes(s, d) for _, s, d in _llama_like_specs(2 * mid + 1)) <= total_bytes:
            lo = mid
        else:
            hi = mid - 1
    return _llama_like_specs(2 * lo + 1)


def _random_tensor(shape: tuple[int, ...], dtype: str, gen: torch.Generator) -> torch.Tensor:
    """Seeded random tensor: floats via float32 randn (bf16/f16 have no direct randn), ints via randint."""
    import torch

    if dtype == "int8":
        return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    if dtype == "int64":
        return torch.randint(-(1 << 40), 1 << 40, shape, generator=gen, dtype=torch.int64)
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
    return t.to(getattr(torch, dtype))


def _assign_shards(sizes: list[int], shards: int) -> list[int]:
    """Split tensors, in order, into ``shards`` contiguous non-empty groups of roughly equal bytes."""
    n = len(sizes)
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be in 1..{n}, got {shards}")
    total = sum(sizes)
    out: list[int] = []
    before = 0
    prev = 0
    for i, size in enumerate(sizes):
        want = min(shards - 1, before * shards // max(total, 1))
        # Never skip a shard number, and leave at least one tensor for every remaining shard.
        idx = 0 if i == 0 else max(prev, min(want, prev + 1), shards - (n - i))
        idx = min(idx, prev + 1, shards - 1)
        out.append(idx)
        prev = idx
        before += size
    return out


def make_safetensors_checkpoint(
    out_dir: Path, total_bytes: int = 80 << 20, shards: int = 3, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write an HF-style sharded checkpoint (shards + index + config.json) of about ``total_bytes``.

    Returns every tensor written, by name, for comparison with what is read back.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = _specs_for_budget(total_bytes)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(shape, dtype, gen) for name, shape, dtype in specs}
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    owner = _assign_shards(sizes, shards)
    shard_names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map: dict[str, str] = {}
    for k, shard_name in enumerate(shard_names):
        part = {name: t for (name, t), o in zip(tensors.items(), owner, strict=True) if o == k}
        save_file(part, str(out_dir / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard_name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    hidden = specs[0][1][1]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": (hidden * 11 // 4) | 1,
        "num_hidden_layers": NUM_LAYERS,
        "vocab_size": specs[0][1][0],
        "torch_dtype": "bfloat16",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tensors


def make_fine_tune(base_dir: Path, out_dir: Path, every: int = 4, seed: int = 7) -> int:
    """A fine-tune of the sharded checkpoint in ``base_dir``: every ``every``-th tensor (in name order) gets
    new values, the rest and the layout (shards, names, shapes, offsets) stay, as a publisher's next
    version does. Returns the bytes of the tensors that changed."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((base_dir / INDEX_NAME).read_text())
    changed_names = set(sorted(index["weight_map"])[::every])
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(str(base_dir / shard))
        for name in sorted(part.keys() & changed_names):
            t = part[name]
            part[name] = _random_tensor(tuple(t.shape), str(t.dtype).removeprefix("torch."), gen)
            changed += t.numel() * t.element_size()
        save_file(part, str(out_dir / shard), metadata={"format": "pt"})
    for name in (INDEX_NAME, "config.json"):
        shutil.copyfile(base_dir / name, out_dir / name)
    return changed


def make_demo_checkpoint(out_dir: Path, total_bytes: int = 256 << 20) -> dict[str, torch.Tensor]:
    """A 4-shard safetensors checkpoint for the demo and benchmark."""
    return make_safetensors_checkpoint(out_dir, total_bytes=total_bytes, shards=4, seed=0)


def make_torch_checkpoint(path: Path, total_bytes: int = 24 << 20, seed: int = 1) -> dict[str, torch.Tensor]:
    """Write a plain ``torch.save`` zip checkpoint with mixed dtypes; return the saved state dict.

    It has >= 12 storages (so zip member order 0,1,...,10,11 differs from name order) and one tied
    weight (two names, one storage), as in models with shared embeddings.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtypes = ["float32", "bfloat16", "float16", "int8", "int64", "float32", "bfloat16"]
    count = 14
    # Odd element counts summing to about total_bytes across the mixed dtypes.
    mean_itemsize = sum(_ITEMSIZE[d] for d in dtypes) / len(dtypes)
    per_tensor = max(1, int(total_bytes / count / mean_itemsize))
    state: dict[str, torch.Tensor] = {}
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        rows = 3 + 2 * (i % 5)
        cols = max(1, per_tensor // rows) | 1
        state[f"blocks.{i}.weight"] = _random_tensor((rows, cols), dtype, gen)
    state["blocks.0.bias"] = _random_tensor((7,), "float32", gen)
    state["lm_head.weight"] = state["blocks.0.weight"]  # tied: shares the storage
    torch.save(state, str(path))
    return state


def load_all_safetensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Load every shard named by the index and copy each tensor out, as ``load_state_dict`` would.

    The copy forces every byte to be read (safetensors may mmap), which is the access pattern to test.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    index = json.loads((ckpt_dir / INDEX_NAME).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, tensor in load_file(str(ckpt_dir / shard)).items():
            out[name] = tensor.clone()
    return out


def write_raw_safetensors(path: Path, tensors: dict[str, bytes], pad: int = 0) -> None:
    """A safetensors file of uint8 tensors with these exact bytes; `pad` lengthens `__metadata__`."""
    import json
    import struct

    header: dict[str, object] = {"__metadata__": {"pad": "x" * pad}}
    off = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(tensors.values()))


def make_variant_set(root: Path, tensors: int = 24, seed: int = 5, scale: int = 1 << 20) -> int:
    """A base checkpoint and its variants under `root`, as publishers make them:

    base/ (the checkpoint), ft/ (a fine-tune: every 4th tensor, 25 %, new), meta/ (base with a longer
    `__metadata__` header: every offset moves), copy/ (base again), plain/ (ft, to upload without a
    manifest). Each dir also has a small config.json. Tensor sizes are 0.5, 1, 3 or 9+ x `scale` bytes.
    Returns the bytes of the tensors that ft changed.
    """
    import json
    import os
    import random

    rnd = random.Random(seed)
    sizes = [rnd.choice([scale // 2, scale, 3 * scale, 9 * scale + 123]) for _ in range(tensors)]
    base = {f"layer{i}.weight": os.urandom(n) for i, n in enumerate(sizes)}
    ft = dict(base)
    changed = 0
    for i in range(0, tensors, 4):
        ft[f"layer{i}.weight"] = os.urandom(sizes[i])
        changed += sizes[i]
    for name, ts, pad in (("base", base, 0), ("ft", ft, 0), ("meta", base, 5000), ("copy", base, 0),
                          ("plain", ft, 0)):
        write_raw_safetensors(root / name / "model.safetensors", ts, pad)
        (root / name / "config.json").write_text(json.dumps({"variant": name}))
    return changed
