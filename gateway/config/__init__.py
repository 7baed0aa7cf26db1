"""config.toml: parsed once into frozen values and validated, every error naming its key."""
