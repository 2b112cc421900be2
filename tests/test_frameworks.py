"""The loaders inference teams call, unmodified, through a real mount of a local directory and of SeaweedFS:
transformers `from_pretrained` (sharded and single-file), vLLM-style `safe_open` in key-name order (also two
processes at once), torch distributed checkpoint, and GGUF. Every tensor must equal what was saved."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import BUCKET, Checkpoint, Mount, requires_fuse
from tests.support.seaweed import SeaweedServer

pytestmark = [requires_fuse, pytest.mark.mount]

PREFIX = "frameworks/"


@dataclass
class Saved:
    """A tree of checkpoints written by the frameworks themselves, and what each should load as."""

    root: Path
    llama: dict[str, torch.Tensor]  # the tiny model's parameters, saved sharded and as one file
    dcp: dict[str, torch.Tensor]
    gguf: dict[str, np.ndarray]


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    import gguf
    import torch.distributed.checkpoint as dcp
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("frameworks")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=192, intermediate_size=520, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "llama-sharded", max_shard_size="600KB")
    model.save_pretrained(root / "llama-single")
    shards = sorted((root / "llama-sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (root / "llama-single" / "model.safetensors").exists()
    llama = {k: v.detach().clone() for k, v in model.state_dict().items()}

    state = {"layer.weight": torch.randn(300, 257), "layer.bias": torch.randn(257).half(),
             "step": torch.tensor(9000), "emb": torch.randint(0, 100, (1000, 31), dtype=torch.int32)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(root / "dcp")))

    arrays = {"token_embd.weight": np.random.default_rng(1).random((64, 100), dtype=np.float32),
              "blk.0.attn_q.weight": np.random.default_rng(2).random((100, 100), dtype=np.float32),
              "blk.0.ffn_up.weight": np.random.default_rng(3).standard_normal((100, 37)).astype(np.float16)}
    writer = gguf.GGUFWriter(str(root / "tiny.gguf"), "llama")
    writer.add_block_count(1)
    for name, arr in arrays.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Saved(root, llama, {k: v.clone() for k, v in state.items()}, arrays)


@pytest.fixture(scope="session")
def s3_saved(seaweed: SeaweedServer, saved: Saved) -> str:
    seaweed.create_bucket(BUCKET)
    seaweed.upload_dir(saved.root, BUCKET, PREFIX)
    return f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(params=["local", "s3"])
def mounted(request: pytest.FixtureRequest, saved: Saved, mounter: Callable[..., Mount]) -> Path:
    """The saved tree, mounted from a local directory or from SeaweedFS."""
    if request.param == "local":
        return mounter(str(saved.root)).path
    seaweed: SeaweedServer = request.getfixturevalue("seaweed")
    return mounter(request.getfixturevalue("s3_saved"), env=seaweed.env()).path


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]


def test_transformers_from_pretrained_sharded_and_single_file(saved: Saved, mounted: Path) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("llama-sharded", "llama-single"):
        model = AutoModelForCausalLM.from_pretrained(mounted / name, dtype=torch.float32)
        assert_same({k: v.detach() for k, v in model.state_dict().items()}, saved.llama)


def test_torch_distributed_checkpoint(saved: Saved, mounted: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {k: torch.zeros_like(v) for k, v in saved.dcp.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(mounted / "dcp")))
    assert_same(state, saved.dcp)


def test_gguf_reader_memory_maps_through_the_mount(saved: Saved, mounted: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(mounted / "tiny.gguf"))
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert got.keys() == saved.gguf.keys()
    for name, want in saved.gguf.items():
        assert got[name].dtype == want.dtype and np.array_equal(got[name].reshape(want.shape), want), name


KEY_ORDER = """
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
root, shards, ref = Path(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
index = json.loads((root / "model.safetensors.index.json").read_text())
mine = sorted(k for k, s in index["weight_map"].items() if s in shards)  # key-name order: layers.10 < layers.2
for key in mine:
    with safe_open(root / index["weight_map"][key], framework="pt") as got, \\
         safe_open(ref / index["weight_map"][key], framework="pt") as want:
        a, b = got.get_tensor(key), want.get_tensor(key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
print(len(mine))
"""


def test_vllm_style_safe_open_in_key_name_order_two_processes_at_once(backend: tuple[str, dict[str, str]],
                                                                       checkpoint: Checkpoint,
                                                                       mounter: Callable[..., Mount]) -> None:
    """As vLLM and SGLang iterate: `safe_open` per shard of the index, `get_tensor` in key-name order
    (`layers.10` before `layers.2`, so the file is read out of order), by two processes reading different
    shards at the same time."""
    source, env = backend
    m = mounter(source, env=env)
    root, ref = m.path / checkpoint.hf_dir, checkpoint.root / checkpoint.hf_dir
    index = json.loads((ref / "model.safetensors.index.json").read_text())
    keys = sorted(index["weight_map"])
    assert keys.index("model.layers.10.mlp.down_proj.weight") < keys.index("model.layers.2.mlp.down_proj.weight")
    shards = sorted(set(index["weight_map"].values()))
    halves = [shards[::2], shards[1::2]]
    procs = [subprocess.Popen([sys.executable, "-c", KEY_ORDER, str(root), ",".join(h), str(ref)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in halves]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert sum(int(out) for out, _ in results) == len(keys)
