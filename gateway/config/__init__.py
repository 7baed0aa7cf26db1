"""config.toml: parsed once into frozen values and validated, every error naming its key.

`load(path)` and `parse(document)` return a `Config` or raise a `ConfigError` that lists every
problem; `diff_engines(old, new)` is what a reload from `old` to `new` changes in the fleet.
The tables' own types are in gateway.config.schema.
"""

from gateway.config.schema import (
    Config,
    ConfigError,
    EngineConfig,
    EngineDiff,
    TenantConfig,
    diff_engines,
    load,
    parse,
)

__all__ = [
    "Config", "ConfigError", "EngineConfig", "EngineDiff", "TenantConfig", "diff_engines", "load",
    "parse",
]  # fmt: skip
