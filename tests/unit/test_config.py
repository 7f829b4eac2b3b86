import pytest

from dualpath.config import DualPathConfig, load_config
from dualpath.errors import ConfigError
from dualpath.storage.config import FaultsStorageConfig, PosixStorageConfig


def test_defaults_validate():
    cfg = load_config(env={})
    assert isinstance(cfg, DualPathConfig)
    assert cfg.storage.kind == "memory"


def test_yaml_file_and_env_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("storage:\n  kind: posix\n  root: /data/kv\ncluster:\n  decode_nodes: 2\n")
    cfg = load_config(f, env={"DUALPATH_CLUSTER__DECODE_NODES": "3", "DUALPATH_STORAGE__IO_THREADS": "4"})
    assert isinstance(cfg.storage, PosixStorageConfig)
    assert str(cfg.storage.root) == "/data/kv" and cfg.storage.io_threads == 4
    assert cfg.cluster.decode_nodes == 3


def test_toml_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[storage]\nkind = "faults"\ndrop_rate = 0.5\n[storage.inner]\nkind = "memory"\n')
    cfg = load_config(f, env={})
    assert isinstance(cfg.storage, FaultsStorageConfig) and cfg.storage.drop_rate == 0.5


def test_unknown_key_names_file_and_dotted_path(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("cluster:\n  decode_nodez: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert str(f) in str(info.value) and "cluster.decode_nodez" in str(info.value)
    assert "unknown key" in str(info.value)


def test_bad_value_names_nested_path(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("storage:\n  kind: faults\n  inner:\n    kind: posix\n    io_threads: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert "storage.inner.io_threads" in str(info.value)


def test_unknown_backend_kind(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("transport:\n  kind: carrier-pigeon\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert "transport" in str(info.value)


def test_malformed_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("storage: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f, env={})


def test_env_error_names_variable_source():
    with pytest.raises(ConfigError, match="DUALPATH_"):
        load_config(env={"DUALPATH_CLUSTER__SNIC_GBPS": "-1"})
