"""Daemon configuration: the typed model, profiles, and loading from TOML, environment and flags."""

from meshd.config.loader import add_run_arguments, build_config, overrides_from_args
from meshd.config.model import (
    ApiConfig,
    Config,
    ConfigError,
    LogConfig,
    MembershipTuning,
    MetricsConfig,
    NodeConfig,
    SecurityConfig,
)
from meshd.config.profiles import PROFILES, profile_tuning

__all__ = [
    "PROFILES",
    "ApiConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "MembershipTuning",
    "MetricsConfig",
    "NodeConfig",
    "SecurityConfig",
    "add_run_arguments",
    "build_config",
    "overrides_from_args",
    "profile_tuning",
]
