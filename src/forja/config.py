"""Typed settings for every forja command: defaults < forja.yaml < FORJA_* environment < CLI flags.

`forja config` prints the resolved settings. The YAML file mirrors these classes one to one;
nested fields are set from the environment with a double underscore (FORJA_GENERATE__TEMPERATURE=0.7).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_HOME = Path("~/.forja").expanduser()
CONFIG_FILE_NAME = "forja.yaml"


class ConfigError(Exception):
    """A config file or value that cannot be used; the message is one line for the user."""


class GenerateSettings(BaseModel):
    """Default sampling for `forja generate` (and later for the server)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, ge=1, le=32768, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    system: str | None = Field(None, description="System prompt; None keeps the chat template's own default.")
    seed: int | None = Field(None, description="Seed for sampling; None draws a fresh one.")


class Settings(BaseSettings):
    """Everything forja reads from its configuration."""

    model_config = SettingsConfigDict(
        env_prefix="FORJA_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(DEFAULT_HOME, description="Models, runs, caches and the database live here (FORJA_HOME).")
    model: str = Field("smollm2-135m", description="Model used when a command gets no --model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for inference; auto = bfloat16 where the hardware runs it fast, else float32."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; None lets torch decide.")
    generate: GenerateSettings = Field(default_factory=GenerateSettings)

    # The YAML file sits below the environment and the CLI flags (init kwargs).
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def versions_dir(self) -> Path:
        return self.home / "models" / "versions"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the file named by FORJA_CONFIG, else ./forja.yaml when it exists."""

    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = config_path()
        if path is None:
            return {}
        return read_yaml(path)


def config_path() -> Path | None:
    explicit = os.environ.get("FORJA_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (set by FORJA_CONFIG or --config)")
        return path
    local = Path.cwd() / CONFIG_FILE_NAME
    return local if local.is_file() else None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(**overrides: Any) -> Settings:
    """Resolve the settings; `overrides` are CLI flags (None values are ignored)."""
    flags = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise ConfigError(f"setting {where!r}: {err['msg']}") from None
    settings.home = settings.home.expanduser()
    return settings
