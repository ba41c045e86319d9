"""Configuration layers and the errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dwcp_agent.config import ConfigError, load_config


def test_layers_defaults_file_environment_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("stream_count: 8\nchunk_size: 2MiB\ncompression_algo: zstd\nlog_level: debug\n")
    assert load_config(environ={}).stream_count == 0  # tuned online by default
    assert load_config(environ={"STREAM_COUNT": "auto"}).stream_count == 0
    from_file = load_config(cfg, environ={})
    assert (from_file.stream_count, from_file.chunk_size, from_file.compression_algo) == (8, 2 << 20, "zstd")
    env = {"STREAM_COUNT": "12", "DWCP_LOG_LEVEL": "warning", "DWCP_CONFIG": str(cfg)}
    from_env = load_config(environ=env)
    assert (from_env.stream_count, from_env.log_level, from_env.compression_algo) == (12, "warning", "zstd")
    flags = load_config(environ=env, overrides={"stream_count": 16, "log_level": None})
    assert (flags.stream_count, flags.log_level) == (16, "warning")


@pytest.mark.parametrize(("source", "key", "message"), [
    ({"STREAM_COUNT": "many"}, "stream_count", "invalid literal"),
    ({"STREAM_COUNT": "300"}, "stream_count", "above the maximum 256"),
    ({"COMPRESSION_ALGO": "gzip"}, "compression_algo", "not one of"),
    ({"TRANSPORT_MODE": "carrier-pigeon"}, "transport_mode", "not one of"),
    ({"DWCP_CHUNK_SIZE": "1000"}, "chunk_size", "below the minimum"),
    ({"DWCP_CHUNK_SIZE": "6000000"}, "chunk_size", "not a whole number"),
    ({"DWCP_STREEM_COUNT": "4"}, "streem_count", "unknown key"),
    ({"ENABLE_V3": "maybe"}, "enable_v3", "expected a boolean"),
    ({"TRACE_SAMPLING": "150"}, "trace_sampling", "above the maximum"),
])
def test_bad_values_name_the_key(source: dict[str, str], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(environ=source)
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_yaml_type_errors_and_unknown_keys_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("stream_count: [1, 2]\n")
    with pytest.raises(ConfigError, match="'stream_count'"):
        load_config(cfg, environ={})
    cfg.write_text("data_prot: 9000\n")
    with pytest.raises(ConfigError, match="'data_prot': unknown key"):
        load_config(cfg, environ={})
    cfg.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(cfg, environ={})


@pytest.mark.parametrize(("args", "env", "key"), [
    (["--set", "stream_count=-1"], {}, "stream_count"),
    ([], {"COMPRESSION_ALGO": "brotli"}, "compression_algo"),
    (["--set", "nonsense=1"], {}, "nonsense"),
    ([], {}, "psk"),
])
def test_serve_with_bad_configuration_exits_2_naming_the_key(tmp_path: Path, args: list[str],
                                                             env: dict[str, str], key: str) -> None:
    base = {"PATH": "/usr/bin:/bin", "DWCP_STATE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "dwcp_agent", "serve", "--admin-port", "0", "--data-port", "0",
                           *args], env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"'{key}'" in proc.stderr


def test_port_in_use_exits_2_naming_the_key(tmp_path: Path) -> None:
    import socket

    psk = tmp_path / "psk"
    psk.write_text("k" * 32)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dwcp_agent", "serve", "--state-dir", str(tmp_path),
                               "--psk-file", str(psk), "--listen-host", "127.0.0.1", "--data-port", str(port),
                               "--admin-port", "0", "--set", "acp_port=0"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "'data_port'" in proc.stderr and "Address already in use" in proc.stderr
