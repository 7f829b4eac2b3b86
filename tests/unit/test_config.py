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


# --- what an outside audit of config files found (each was a traceback or a silent acceptance) ---


def test_a_yaml_key_given_twice_is_an_error_naming_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``cluster:`` section silently replaced the first."""
    f = tmp_path / "dup.yaml"
    f.write_text("cluster:\n  decode_nodes: 1\nstorage: {kind: memory}\ncluster:\n  prefill_nodes: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert str(info.value) == f"{f}: not valid YAML: line 4, column 1: key 'cluster' given twice (first on line 1)"
    f.write_text("cluster:\n  decode_nodes: 1\n  decode_nodes: 3\n")
    with pytest.raises(ConfigError, match="line 3, column 3: key 'decode_nodes' given twice"):
        load_config(f, env={})
    # a merge key's keys may be overridden (that is what it is for); anchors still work
    from dualpath.config import parse_yaml

    got = parse_yaml("base: &b {prefill_nodes: 2, decode_nodes: 1}\ncluster:\n  <<: *b\n  decode_nodes: 3\n")
    assert got["cluster"] == {"prefill_nodes": 2, "decode_nodes": 3}
    with pytest.raises(ConfigError, match="line 4, column 3: key 'decode_nodes' given twice"):
        parse_yaml("base: &b {prefill_nodes: 2}\ncluster:\n  decode_nodes: 1\n  decode_nodes: 3\n  <<: *b\n")


def test_a_json_file_is_strict_json(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"cluster": {"decode_nodes": 3}}')
    assert load_config(f, env={}).cluster.decode_nodes == 3
    f.write_text('{"cluster": {"decode_nodes": 2,}}')  # YAML would take the trailing comma
    with pytest.raises(ConfigError, match=r"c.json: not valid JSON: .*line 1 column 32"):
        load_config(f, env={})
    f.write_text('{"cluster": {"decode_nodes": 2, "decode_nodes": 1}}')
    with pytest.raises(ConfigError, match="key 'decode_nodes' given twice"):
        load_config(f, env={})


def test_a_file_not_in_utf8_names_its_line(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"cluster:\n  decode_nodes: 2 # caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    assert str(info.value) == (f"{f}: not UTF-8 text (line 2: byte 0xe9 at offset 32); save the config file as "
                               "UTF-8")


def test_scientific_notation_is_a_number_in_files_and_variables(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e9`` as a string, which an integer field refused as 'unable to parse string'."""
    f = tmp_path / "c.yaml"
    f.write_text("cluster:\n  host_buffer_bytes: 1e9\n  prefill_quota_s: 2.5E-1\n")
    cfg = load_config(f, env={"DUALPATH_CLUSTER__KV_POOL_TOKENS": "1.5e5"})
    assert cfg.cluster.host_buffer_bytes == 10**9 and cfg.cluster.kv_pool_tokens == 150000
    assert cfg.cluster.prefill_quota_s == 0.25
    f.write_text("cluster:\n  host_buffer_bytes: 1.5e0\n")
    with pytest.raises(ConfigError, match="cluster.host_buffer_bytes: Input should be a valid integer"):
        load_config(f, env={})
    f.write_text("cluster:\n  host_buffer_bytes: 1e400\n")
    with pytest.raises(ConfigError, match="cluster.host_buffer_bytes: Input should be a finite number"):
        load_config(f, env={})
    f.write_text("workload:\n  dataset: '1e9'\n")  # quoted: still a string
    with pytest.raises(ConfigError, match="workload.dataset: unknown dataset '1e9'"):
        load_config(f, env={})


def test_errors_name_the_variable_the_kind_and_say_it_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(env={"DUALPATH_CLUSTER__DECODE_NODES": "x"}, overrides={"cluster": {"snic_gbps": "3 furlongs"}})
    lines = str(info.value).splitlines()
    assert lines[0].startswith("environment variable DUALPATH_CLUSTER__DECODE_NODES: cluster.decode_nodes: ")
    # a validator's message that names its field already is not prefixed with pydantic's "Value error, " + field
    assert lines[1] == ("overrides: cluster.snic_gbps: cannot read '3 furlongs' as a bandwidth; write e.g. 50GB/s, "
                        "400Gbps or 50 (a bare number is GB/s)")
    with pytest.raises(ConfigError, match=r"environment variable DUALPATH_CLUSTER__DECODE_NODES: cannot parse value "
                                          r"'\[a': line 1, column 3: expected ',' or '\]'"):
        load_config(env={"DUALPATH_CLUSTER__DECODE_NODES": "[a"})
    f = tmp_path / "t.yaml"
    f.write_text("transport:\n  kind: zmqq\n")
    with pytest.raises(ConfigError, match=f"^{f}: transport.kind: Input tag 'zmqq'"):
        load_config(f, env={})
