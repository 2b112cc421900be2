"""Configuration: defaults, TOML, overrides, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfs.config import MiB, load_config, parse_size
from modelfs.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_documents_every_setting_and_loads() -> None:
    cfg = load_config(str(REPO / "daemon" / "modelfs.toml"))
    assert cfg.cache.extent_size == 8 * MiB
    text = (REPO / "daemon" / "modelfs.toml").read_text()
    import dataclasses

    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            assert f"[{section.name}]" in text
            for f in dataclasses.fields(value):
                assert f"{f.name} =" in text, f"{section.name}.{f.name} is not documented in daemon/modelfs.toml"


@pytest.mark.parametrize(("text", "expected"), [(8388608, 8 * MiB), ("8MiB", 8 * MiB), ("8M", 8 * MiB),
                                                ("1.5GiB", 1536 * MiB), ("64k", 65536)])
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text, "k") == expected


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[cache]\nextnt_size = "8MiB"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'cache.extnt_size'"):
        load_config(str(p))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("fetch.concurrency", "many", "fetch.concurrency must be an integer"),
    ("mount.allow_other", "perhaps", "mount.allow_other must be true or false"),
    ("cache.extent_size", "huge", "cache.extent_size must be a size"),
    ("cache.extent_size", "1000", "multiple of 4KiB"),
    ("mount.file_mode", "999", "octal mode"),
    ("log.level", "LOUD", "log.level"),
    ("nosection.key", "1", "unknown key 'nosection'"),
])
def test_bad_values(key: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, {key: value})


def test_wrong_toml_type_and_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[fetch]\nconcurrency = true\n")
    with pytest.raises(ConfigError, match=r"fetch\.concurrency must be an integer"):
        load_config(str(p))
    p.write_text("[fetch\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "missing.toml"))


def test_overrides_beat_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('source = "s3://bucket/a"\n[fetch]\nconcurrency = 4\n[mount]\nfile_mode = "0440"\n')
    cfg = load_config(str(p), {"fetch.concurrency": "12"})
    assert cfg.source == "s3://bucket/a"
    assert cfg.fetch.concurrency == 12
    assert cfg.mount.file_mode == 0o440
