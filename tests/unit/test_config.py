"""Tests for meshd.config.loader: layering, profiles, parsing and validation errors."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import socket
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.config.loader import (
    SETTING_NAMES,
    add_run_arguments,
    build_config,
    env_name,
    overrides_from_args,
)
from meshd.config.model import (
    ApiConfig,
    Config,
    ConfigError,
    LogConfig,
    MembershipTuning,
    MetricsConfig,
    NodeConfig,
    PlacementTuning,
    ReplicationLimits,
    SecurityConfig,
    StorageTuning,
    TracingConfig,
    TransportTuning,
)
from meshd.config.profiles import PROFILES

KEY16 = base64.b64encode(bytes(range(16))).decode()
KEY24 = base64.b64encode(bytes(range(24))).decode()
KEY32 = base64.b64encode(bytes(range(32))).decode()
INSECURE: Mapping[str, object] = {"security.insecure": True}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return str(path)


def build(
    toml: str | None = None,
    *,
    tmp_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: object,
) -> Config:
    """build_config with dotted overrides spelled as keyword arguments (node__bind=...)."""
    file = None
    if toml is not None:
        assert tmp_path is not None
        file = write(tmp_path, toml)
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    return build_config(file, env or {}, {**INSECURE, **dotted})


def error_for(
    toml: str | None = None,
    *,
    tmp_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ConfigError:
    file = write(tmp_path, toml) if toml is not None and tmp_path is not None else None
    with pytest.raises(ConfigError) as info:
        build_config(file, env or {}, overrides if overrides is not None else INSECURE)
    return info.value


# --- defaults and layering ------------------------------------------------------------------------


def test_defaults() -> None:
    config = build_config(None, {}, INSECURE)
    assert config.profile == "lan"
    assert config.membership == PROFILES["lan"]
    assert config.node.name == socket.gethostname()
    assert config.node.bind == ("0.0.0.0", 7946)
    assert config.node.advertise is None
    assert config.api == ApiConfig()
    assert config.metrics == MetricsConfig()
    assert config.log == LogConfig()
    assert config.security == SecurityConfig(insecure=True)
    assert config.source is None


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    toml = """
        [node]
        name = "from-file"
        data_dir = "/file"
        advertise = "10.0.0.1:7000"
        [log]
        level = "debug"
        format = "json"
        [security]
        insecure = true
    """
    env = {
        "MESHD_NODE_NAME": "from-env",
        "MESHD_NODE_DATA_DIR": "/env",
        "MESHD_LOG_LEVEL": "warning",
    }
    config = build_config(write(tmp_path, toml), env, {"node.name": "from-flag"})
    assert config.node.name == "from-flag"  # flag > env > file
    assert config.node.data_dir == "/env"  # env > file
    assert config.log.level == "warning"
    assert config.node.advertise == ("10.0.0.1", 7000)  # file > default
    assert config.log.format == "json"
    assert config.node.bind == ("0.0.0.0", 7946)  # default


def test_membership_layers_apply_over_the_profile(tmp_path: Path) -> None:
    toml = """
        profile = "lan"
        [membership]
        probe_interval = "4s"
        gossip_nodes = 5
        suspicion_mult = 7
    """
    env = {"MESHD_PROFILE": "wan", "MESHD_MEMBERSHIP_GOSSIP_NODES": "6"}
    config = build(toml, tmp_path=tmp_path, env=env, membership__suspicion_mult=8)
    wan = PROFILES["wan"]
    assert config.profile == "wan"
    assert config.membership == dataclasses.replace(
        wan, probe_interval=4.0, gossip_nodes=6, suspicion_mult=8
    )


def test_profile_chosen_by_a_flag_still_yields_to_file_tuning(tmp_path: Path) -> None:
    config = build("[membership]\nprobe_timeout = 0.9\n", tmp_path=tmp_path, profile="local")
    assert config.profile == "local"
    assert config.membership == dataclasses.replace(PROFILES["local"], probe_timeout=0.9)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile(name: str, tmp_path: Path) -> None:
    by_file = build(f'profile = "{name}"\n', tmp_path=tmp_path)
    by_env = build(env={"MESHD_PROFILE": name.upper()})
    by_flag = build(profile=name)
    for config in (by_file, by_env, by_flag):
        assert config.profile == name
        assert config.membership == PROFILES[name]
    PROFILES[name].validate()


def test_unknown_profile() -> None:
    err = error_for(overrides={**INSECURE, "profile": "moon"})
    assert err.key == "profile"
    assert "lan" in err.problem


def test_none_override_means_not_given() -> None:
    config = build(env={"MESHD_NODE_NAME": "env"}, node__name=None)
    assert config.node.name == "env"


def test_empty_env_value_unsets_optional_settings(tmp_path: Path) -> None:
    toml = '[node]\nadvertise = "10.0.0.1:1"\nseeds = ["a"]\n'
    env = {"MESHD_NODE_ADVERTISE": "", "MESHD_NODE_SEEDS": ""}
    config = build(toml, tmp_path=tmp_path, env=env)
    assert config.node.advertise is None
    assert config.node.seeds == ()


def test_lists_replace_rather_than_merge(tmp_path: Path) -> None:
    toml = '[node]\nseeds = ["a", "b"]\ntags = { role = "web" }\n'
    config = build(toml, tmp_path=tmp_path, node__seeds=["c"], node__tags={"dc": "x"})
    assert config.node.seeds == (("c", 7946),)
    assert config.node.tags == {"dc": "x"}


def test_every_model_field_is_a_setting() -> None:
    sections = {
        "node": NodeConfig,
        "membership": MembershipTuning,
        "placement": PlacementTuning,
        "storage": StorageTuning,
        "replication": ReplicationLimits,
        "transport": TransportTuning,
        "security": SecurityConfig,
        "api": ApiConfig,
        "metrics": MetricsConfig,
        "tracing": TracingConfig,
        "log": LogConfig,
    }
    expected = {"profile"} | {
        f"{section}.{field.name}"
        for section, cls in sections.items()
        for field in dataclasses.fields(cls)
    }
    assert set(SETTING_NAMES) == expected
    assert env_name("node.data_dir") == "MESHD_NODE_DATA_DIR"


def test_transport_bounds_are_configurable_and_checked(tmp_path: Path) -> None:
    config = build(
        '[transport]\nmax_unauthenticated = 64\nheader_timeout = "2s"\n', tmp_path=tmp_path
    )
    assert config.transport.max_unauthenticated == 64
    assert config.transport.header_timeout == 2.0
    assert config.transport.max_connections == TransportTuning().max_connections
    assert build().transport == TransportTuning()
    env = build_config(None, {"MESHD_TRANSPORT_MAX_PREAUTH_BYTES": "4096"}, INSECURE)
    assert env.transport.max_preauth_bytes == 4096
    for key, value in [
        ("transport.max_unauthenticated", 0),
        ("transport.max_unauthenticated", 100_000),  # more than max_connections
        ("transport.max_exchanges", 0),
        ("transport.max_connections", 1),
        ("transport.max_preauth_bytes", 10),
        ("transport.header_timeout", "0s"),
        ("transport.header_timeout", "1h"),
    ]:
        err = error_for(overrides={**INSECURE, key: value})
        assert err.key == key, (key, value, err)


def test_api_bounds_are_configurable_and_checked() -> None:
    config = build(
        api__max_sessions="20",
        api__max_streams=100,
        api__max_streams_total=1000,
        api__partial_frame_timeout="1500ms",
        api__max_buffered=1 << 20,
    )
    assert (config.api.max_sessions, config.api.max_streams, config.api.max_streams_total) == (
        20,
        100,
        1000,
    )
    assert config.api.partial_frame_timeout == 1.5
    assert config.api.max_buffered == 1 << 20
    assert build().api == ApiConfig()
    for key, value in [
        ("api.max_sessions", 0),
        ("api.max_streams", 0),
        ("api.max_streams_total", 10),  # below api.max_streams
        ("api.partial_frame_timeout", "0s"),
        ("api.max_buffered", 1000),
    ]:
        err = error_for(overrides={**INSECURE, key: value})
        assert err.key == key, (key, value, err)


def test_settings_given_in_several_layers_say_which_won(tmp_path: Path) -> None:
    file = write(tmp_path, '[node]\nname = "from-file"\n[api]\nmax_sessions = 10\n')
    config = build_config(
        file,
        {"MESHD_API_MAX_SESSIONS": "20", "MESHD_LOG_LEVEL": "debug"},
        {**INSECURE, "node.name": "from-flag"},
    )
    assert config.node.name == "from-flag" and config.api.max_sessions == 20
    assert config.overridden == (
        f"node.name: from the command line (over in {file})",
        f"api.max_sessions: from MESHD_API_MAX_SESSIONS (over in {file})",
    )
    assert build_config(file, {}, INSECURE).overridden == ()


def test_storage_is_configurable_and_checked(tmp_path: Path) -> None:
    config = build(
        '[storage]\nsync_interval = "5ms"\nsnapshot_min_log = 1048576\n', tmp_path=tmp_path
    )
    assert config.storage.sync_interval == 0.005
    assert config.storage.snapshot_min_log == 1 << 20
    assert config.storage.enabled
    assert build().storage == StorageTuning()
    err = error_for(overrides={**INSECURE, "storage.sync_interval": "1m"})
    assert err.key == "storage.sync_interval"
    err = error_for(overrides={**INSECURE, "storage.max_pending": "10"})
    assert err.key == "storage.max_pending"
    assert not build_config(None, {"MESHD_STORAGE_ENABLED": "false"}, INSECURE).storage.enabled


def test_every_membership_field_round_trips_through_set() -> None:
    lan = PROFILES["lan"]
    overrides: dict[str, object] = {
        f"membership.{field.name}": str(getattr(lan, field.name))
        for field in dataclasses.fields(MembershipTuning)
    }
    assert build_config(None, {}, {**INSECURE, **overrides}).membership == lan


def test_placement_timing_is_configurable_and_checked(tmp_path: Path) -> None:
    config = build('[placement]\nstable_after = "45s"\nstop_after = 2\n', tmp_path=tmp_path)
    assert (config.placement.stable_after, config.placement.stop_after) == (45.0, 2.0)
    assert build().placement == PlacementTuning()
    err = error_for(overrides={**INSECURE, "placement.stop_after": "30s"})
    assert err.key == "placement.stop_after" and "stable_after" in err.problem
    err = error_for(overrides={**INSECURE, "placement.rebalance_batch": "0"})
    assert err.key == "placement.rebalance_batch"


# --- the file and MESHD_CONFIG --------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    toml = f"""
        profile = "local"
        [node]
        name = "n1.example"
        bind = "[::]:0"
        advertise = "[2001:db8::1]:7946"
        seeds = ["seed-1.example.com", "10.0.0.2:8000", "[fe80::1%eth0]:7"]
        tags = {{ role = "web", dc = "eu-1" }}
        data_dir = "/tmp/meshd"
        [membership]
        probe_interval = "1500ms"
        tcp_fallback_probe = false
        [security]
        keys = ["{KEY32}", "{KEY16}"]
        keyring_file = "/etc/meshd/keyring"
        label = "prod"
        [api]
        socket = "/tmp/meshd.sock"
        mode = "0600"
        allow_uids = [0, 1000]
        allow_gids = [27]
        [metrics]
        enabled = true
        bind = "localhost:9100"
        [log]
        level = "ERROR"
        format = "json"
    """
    path = write(tmp_path, toml)
    config = build_config(path, {}, {})
    assert config.source == path
    assert config.profile == "local"
    assert config.node == NodeConfig(
        name="n1.example",
        bind=("::", 0),
        advertise=("2001:db8::1", 7946),
        seeds=(("seed-1.example.com", 7946), ("10.0.0.2", 8000), ("fe80::1%eth0", 7)),
        tags={"role": "web", "dc": "eu-1"},
        data_dir="/tmp/meshd",
    )
    assert config.membership == dataclasses.replace(
        PROFILES["local"], probe_interval=1.5, tcp_fallback_probe=False
    )
    assert config.security == SecurityConfig(
        keys=(KEY32, KEY16), keyring_file="/etc/meshd/keyring", label="prod"
    )
    assert config.api == ApiConfig(
        socket="/tmp/meshd.sock", mode=0o600, allow_uids=(0, 1000), allow_gids=(27,)
    )
    assert config.metrics == MetricsConfig(enabled=True, bind=("localhost", 9100))
    assert config.log == LogConfig(level="error", format="json")


def test_meshd_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "via-env"\n')
    config = build_config(None, {"MESHD_CONFIG": path}, INSECURE)
    assert config.node.name == "via-env"
    assert config.source == path


def test_explicit_file_beats_meshd_config(tmp_path: Path) -> None:
    explicit = write(tmp_path, '[node]\nname = "explicit"\n')
    config = build_config(explicit, {"MESHD_CONFIG": str(tmp_path / "missing.toml")}, INSECURE)
    assert config.node.name == "explicit"
    assert config.source == explicit


def test_missing_file(tmp_path: Path) -> None:
    err = error_for(env={"MESHD_CONFIG": str(tmp_path / "nope.toml")})
    assert err.key == "config"
    assert "nope.toml" in err.problem


def test_invalid_toml(tmp_path: Path) -> None:
    err = error_for("[node\nname=", tmp_path=tmp_path)
    assert err.key == "config"
    assert "not valid TOML" in err.problem


# --- validation errors name the offending key -----------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[node]\nnmae = "x"\n', "node.nmae"),
        ('[nod]\nname = "x"\n', "nod"),
        ('profle = "lan"\n', "profle"),
        ("node = 3\n", "node"),
        ("[node.extra]\nx = 1\n", "node.extra"),
        ("[membership]\nprobe_intervall = 1\n", "membership.probe_intervall"),
        ("[node]\nname = 3\n", "node.name"),
        ("[membership]\nprobe_interval = true\n", "membership.probe_interval"),
        ("[membership]\ngossip_nodes = 2.5\n", "membership.gossip_nodes"),
        ('[security]\ninsecure = "maybe"\n', "security.insecure"),
        ("[node]\ntags = { a = 1 }\n", "node.tags"),
        ("[api]\nallow_uids = [-1]\n", "api.allow_uids"),
        ("[api]\nmode = 660\n", "api.mode"),
        ('[api]\nmode = "0999"\n', "api.mode"),
        ("[membership]\nprobe_interval = inf\n", "membership.probe_interval"),
        ("[placement]\nstable_aftr = 5\n", "placement.stable_aftr"),
        ('[placement]\nstable_after = "soon"\n', "placement.stable_after"),
    ],
)
def test_file_errors(toml: str, key: str, tmp_path: Path) -> None:
    err = error_for(toml, tmp_path=tmp_path, overrides={})
    assert err.key == key
    assert str(tmp_path) in err.problem


def test_unknown_file_key_suggests_the_right_one(tmp_path: Path) -> None:
    err = error_for('[node]\nnmae = "x"\n', tmp_path=tmp_path)
    assert "did you mean node.name" in err.problem


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MESHD_NODE_NMAE": "x"}, "MESHD_NODE_NMAE"),
        ({"MESHD_MEMBERSHIP_PROBE": "1s"}, "MESHD_MEMBERSHIP_PROBE"),
        ({"MESHD_LOG_name": "x"}, "MESHD_LOG_name"),
        ({"MESHD_NODE_BIND": "127.0.0.1"}, "node.bind"),
        ({"MESHD_MEMBERSHIP_GOSSIP_NODES": "three"}, "membership.gossip_nodes"),
        ({"MESHD_SECURITY_INSECURE": "maybe"}, "security.insecure"),
        ({"MESHD_LOG_LEVEL": "loud"}, "log.level"),
        ({"MESHD_LOG_FORMAT": "xml"}, "log.format"),
        ({"MESHD_API_ALLOW_UIDS": "1,x"}, "api.allow_uids"),
        ({"MESHD_PROFILE": "moon"}, "profile"),
    ],
)
def test_env_errors(env: dict[str, str], key: str) -> None:
    assert error_for(env=env, overrides={}).key == key


def test_env_error_says_where_the_value_came_from() -> None:
    err = error_for(env={"MESHD_MEMBERSHIP_PROBE_INTERVAL": "abc"})
    assert err.key == "membership.probe_interval"
    assert "expected a duration" in err.problem
    assert "'abc'" in err.problem
    assert "MESHD_MEMBERSHIP_PROBE_INTERVAL" in err.problem


def test_unrelated_meshd_variables_are_ignored() -> None:
    env = {"MESHD_SOCKET": "/tmp/x.sock", "MESHD_FOO_BAR": "1", "MESHD_NODE": "x", "PATH": "/bin"}
    assert build(env=env).api.socket == ApiConfig().socket


def test_wrong_type_message() -> None:
    err = error_for(overrides={**INSECURE, "membership.indirect_checks": "abc"})
    assert err.problem.startswith("expected an integer, got 'abc'")


def test_unknown_override() -> None:
    assert error_for(overrides={"node.nmae": "x"}).key == "node.nmae"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("node.bind", "example.com:7946"),  # bind needs an IP literal
        ("node.bind", "127.0.0.1"),  # no port
        ("node.bind", "127.0.0.1:65536"),
        ("node.bind", "127.0.0.1:-1"),
        ("node.bind", "127.0.0.1:http"),
        ("node.bind", ":7946"),
        ("node.bind", "::1:7946"),  # IPv6 without brackets
        ("node.bind", "[::1:7946"),
        ("node.bind", "[127.0.0.1]:7946"),
        ("node.bind", "[::1]x"),
        ("node.bind", "256.0.0.1:1"),
        ("node.advertise", "10.0.0.1:0"),  # port 0 only for binding
        ("node.advertise", "host.example:1"),
        ("node.seeds", ["ok.example", "-bad-.example"]),
        ("node.seeds", "10.0.0.1:0"),
        ("node.seeds", "10.0.0.300"),
        ("node.seeds", ["a" * 64 + ".example"]),
        ("metrics.bind", "localhost"),
    ],
)
def test_bad_addresses(key: str, value: object) -> None:
    assert error_for(overrides={**INSECURE, key: value}).key == key


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("membership.probe_timeout", "1s", "less than probe_interval"),
        ("membership.probe_interval", "-1s", "must be > 0"),
        ("membership.probe_interval", "0", "must be > 0"),
        ("membership.gossip_to_dead", -1, "must be >= 0"),
        ("membership.udp_packet_size", 100, "between 512"),
        ("membership.join_retry_min", "1m", "join_retry_max"),
        ("membership.probe_interval", "1x", "expected a duration"),
        ("membership.probe_interval", "ms", "expected a duration"),
        ("membership.probe_interval", "", "expected a duration"),
        ("membership.probe_interval", "1e3", "expected a duration"),
        ("membership.probe_interval", [1], "got a list"),
        ("node.name", "", "not a valid node name"),
        ("node.name", "has space", "not a valid node name"),
        ("node.name", "x" * 129, "not a valid node name"),
        ("node.data_dir", "", "must not be empty"),
        ("api.socket", "/" + "s" * 107, "Unix socket"),
        ("api.mode", 0o1000, "outside"),
        ("api.mode", "rw-", "file mode"),
        ("security.label", "l" * 65, "at most 64"),
    ],
)
def test_value_errors(key: str, value: object, problem: str) -> None:
    err = error_for(overrides={**INSECURE, key: value})
    assert err.key == key
    assert problem in err.problem


# --- security -------------------------------------------------------------------------------------


def test_valid_key_sizes() -> None:
    config = build_config(None, {"MESHD_SECURITY_KEYS": f"{KEY16}, {KEY24},{KEY32}"}, {})
    assert config.security.keys == (KEY16, KEY24, KEY32)
    assert not config.security.insecure


@pytest.mark.parametrize(
    "bad",
    [
        base64.b64encode(bytes(20)).decode(),  # wrong length
        base64.b64encode(bytes(33)).decode(),
        "not base64!!",
        KEY16[:-2],  # bad padding
    ],
)
def test_bad_keys_name_security_keys_and_hide_the_key(bad: str) -> None:
    err = error_for(overrides={"security.keys": [KEY32, bad]})
    assert err.key == "security.keys"
    assert "item 2" in err.problem
    assert bad not in str(err)


def test_no_key_without_insecure() -> None:
    err = error_for(overrides={})
    assert err.key == "security.keys"
    assert "--insecure" in err.problem


def test_keyring_file_is_enough() -> None:
    config = build_config(None, {"MESHD_SECURITY_KEYRING_FILE": "/etc/meshd/keyring"}, {})
    assert config.security.keyring_file == "/etc/meshd/keyring"


def test_insecure_with_keys_is_refused() -> None:
    err = error_for(overrides={**INSECURE, "security.keys": [KEY16]})
    assert err.key == "security.insecure"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_env_booleans(text: str, expected: bool) -> None:
    env = {"MESHD_METRICS_ENABLED": text}
    assert build(env=env).metrics.enabled is expected


# --- durations, addresses, tags -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1s", 1.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        (" 250 ms ", 0.25),
        ("7", 7.0),
        ("2.5", 2.5),
        (".5h", 1800.0),
        (3, 3.0),
        (0.75, 0.75),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    config = build(membership__push_pull_interval=text)
    assert config.membership.push_pull_interval == pytest.approx(seconds)


@given(st.integers(min_value=1, max_value=10**9))
def test_millisecond_durations(ms: int) -> None:
    config = build(membership__gossip_to_dead=f"{ms}ms")
    assert config.membership.gossip_to_dead == pytest.approx(ms / 1000)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("[::1]:7946", ("::1", 7946)),
        ("[::]:0", ("::", 0)),
        ("[2001:DB8:0:0::1]:65535", ("2001:db8::1", 65535)),
        ("[::ffff:10.0.0.1]:1", ("::ffff:a00:1", 1)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (" 192.168.1.10:7946 ", ("192.168.1.10", 7946)),
    ],
)
def test_bind_addresses(text: str, address: tuple[str, int]) -> None:
    assert build(node__bind=text).node.bind == address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("[::1]", ("::1", 7946)),
        ("[::1]:8000", ("::1", 8000)),
        ("10.1.2.3", ("10.1.2.3", 7946)),
        ("localhost", ("localhost", 7946)),
        ("Node-7.Example.COM.", ("Node-7.Example.COM.", 7946)),
        ("seed:1", ("seed", 1)),
    ],
)
def test_seed_addresses(text: str, address: tuple[str, int]) -> None:
    assert build(env={"MESHD_NODE_SEEDS": text}).node.seeds == (address,)


def test_seeds_from_env_are_comma_separated() -> None:
    config = build(env={"MESHD_NODE_SEEDS": "a.example, [::1]:9,10.0.0.1:8,"})
    assert config.node.seeds == (("a.example", 7946), ("::1", 9), ("10.0.0.1", 8))


def test_tags_from_env() -> None:
    config = build(env={"MESHD_NODE_TAGS": "role=web, dc=eu-1,expr=a=b"})
    assert config.node.tags == {"role": "web", "dc": "eu-1", "expr": "a=b"}


@pytest.mark.parametrize(
    "tags",
    [
        {f"k{i}": "v" for i in range(33)},  # too many
        {"k": "v" * 512},  # too big
        {"ключ": "д" * 254},  # 8 + 508 bytes in UTF-8: too big though 258 characters
        "novalue",
        "=v",
        "a=1,a=2",
        ["a=1", 2],
        42,
    ],
)
def test_bad_tags(tags: object) -> None:
    assert error_for(overrides={**INSECURE, "node.tags": tags}).key == "node.tags"


def test_tag_limits_are_inclusive() -> None:
    tags = {f"k{i:02}": "v" * 13 for i in range(32)}  # 32 pairs of 3 + 13 = 512 bytes
    assert build(node__tags=tags).node.tags == tags


def test_api_mode_and_ids_from_env() -> None:
    env = {"MESHD_API_MODE": "0o640", "MESHD_API_ALLOW_UIDS": "0, 1000", "MESHD_API_ALLOW_GIDS": ""}
    config = build(env=env)
    assert config.api.mode == 0o640
    assert config.api.allow_uids == (0, 1000)
    assert config.api.allow_gids == ()


# --- argparse -------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshd run")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def test_no_flags_no_overrides() -> None:
    ns = parse([])
    assert overrides_from_args(ns) == {}
    assert ns.config is None


def test_flags_become_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "file"\nseeds = ["old"]\n')
    ns = parse(
        [
            "--config", path,
            "--profile", "wan",
            "--name", "flag",
            "--bind", "127.0.0.1:0",
            "--advertise", "[::1]:7000",
            "--seed", "a.example",
            "--seed", "[::1]:9",
            "--tag", "role=web",
            "--tag", "dc=x",
            "--key", KEY16,
            "--label", "prod",
            "--socket", "/tmp/m.sock",
            "--metrics-bind", "127.0.0.1:0",
            "--log-level", "debug",
            "--log-format", "json",
            "--data-dir", "/tmp/d",
            "--no-rejoin",
            "--set", "membership.probe_interval=6s",
            "--set", "api.mode=0600",
        ]
    )  # fmt: skip
    config = build_config(ns.config, {}, overrides_from_args(ns))
    assert config.source == path
    assert config.profile == "wan"
    assert config.node == NodeConfig(
        name="flag",
        bind=("127.0.0.1", 0),
        advertise=("::1", 7000),
        seeds=(("a.example", 7946), ("::1", 9)),
        tags={"role": "web", "dc": "x"},
        data_dir="/tmp/d",
        rejoin=False,
    )
    assert config.membership == dataclasses.replace(PROFILES["wan"], probe_interval=6.0)
    assert config.security == SecurityConfig(keys=(KEY16,), label="prod")
    assert config.api.socket == "/tmp/m.sock"
    assert config.api.mode == 0o600
    assert config.metrics == MetricsConfig(enabled=True, bind=("127.0.0.1", 0))
    assert config.log == LogConfig(level="debug", format="json")


def test_rejoin_is_on_by_default_and_can_be_turned_off_in_every_layer(tmp_path: Path) -> None:
    assert build().node.rejoin is True
    assert build("[node]\nrejoin = false\n", tmp_path=tmp_path).node.rejoin is False
    assert build(env={"MESHD_NODE_REJOIN": "no"}).node.rejoin is False
    assert overrides_from_args(parse(["--no-rejoin"])) == {"node.rejoin": False}
    assert overrides_from_args(parse(["--rejoin"])) == {"node.rejoin": True}
    err = error_for(overrides={**INSECURE, "node.rejoin": "maybe"})
    assert err.key == "node.rejoin" and "true or false" in err.problem


def test_insecure_and_keyring_flags() -> None:
    assert overrides_from_args(parse(["--insecure"])) == {"security.insecure": True}
    overrides = overrides_from_args(parse(["--keyring-file", "/k"]))
    assert overrides == {"security.keyring_file": "/k"}


def test_dedicated_flag_beats_set() -> None:
    ns = parse(["--name", "flag", "--set", "node.name=set", "--set", "log.level=error"])
    assert overrides_from_args(ns) == {"node.name": "flag", "log.level": "error"}


def test_set_with_unknown_key_is_a_config_error() -> None:
    ns = parse(["--set", "membership.probe_intervall=2s"])
    err = error_for(overrides={**INSECURE, **overrides_from_args(ns)})
    assert err.key == "membership.probe_intervall"
    assert "did you mean membership.probe_interval" in err.problem


def test_set_without_equals_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--set", "node.name"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bad_flag_value_names_the_setting() -> None:
    ns = parse(["--insecure", "--bind", "localhost:1"])
    err = error_for(overrides=overrides_from_args(ns))
    assert err.key == "node.bind"
    assert "command line" in err.problem


def test_the_local_profile_keeps_each_daemon_store_under_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    local = build_config(None, {}, {**INSECURE, "profile": "local", "node.name": "a"})
    assert local.node.data_dir == str(tmp_path / ".meshd" / "a")
    lan = build_config(None, {}, {**INSECURE, "node.name": "a"})
    assert lan.node.data_dir == "/var/lib/meshd"
    given = build_config(
        None, {}, {**INSECURE, "profile": "local", "node.data_dir": str(tmp_path / "x")}
    )
    assert given.node.data_dir == str(tmp_path / "x")


def test_tracing_settings_are_parsed_and_checked(tmp_path: Path) -> None:
    insecure = {"security.insecure": True}
    assert build_config(None, {}, insecure).tracing.endpoint == ""  # off by default
    path = tmp_path / "meshd.toml"
    path.write_text(
        '[tracing]\nendpoint = "http://127.0.0.1:4318/v1/traces"\nsample_ratio = 0.25\n'
        'max_queue = 100\nexport_timeout = "2s"\nservice_name = "mesh-a"\n'
    )
    tracing = build_config(str(path), {}, insecure).tracing
    assert tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert (tracing.sample_ratio, tracing.max_queue, tracing.export_timeout) == (0.25, 100, 2.0)
    assert tracing.service_name == "mesh-a"
    for key, value in [
        ("tracing.endpoint", "collector:4318"),
        ("tracing.sample_ratio", "1.5"),
        ("tracing.sample_ratio", "lots"),
        ("tracing.max_queue", "0"),
        ("tracing.export_timeout", "0s"),
        ("tracing.service_name", ""),
    ]:
        with pytest.raises(ConfigError) as info:
            build_config(None, {}, {**insecure, key: value})
        assert key in str(info.value)
