"""The full run config: YAML + dotted CLI overrides, validated in one place before any model loads.

Errors are one line, naming the key, with a "did you mean" for misspellings:
    config error: configs/quickstart.yaml: unknown key 'ppo.kl_cof' (did you mean 'ppo.kl_coef'?)
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from stages.core.config_schema import RunConfig, Section


class ConfigError(ValueError):
    """A config problem, reported to the user as one line."""


class LaunchConfig(Section):
    """How each stage is started with `accelerate launch`."""

    accelerate_config: str | None = Field(None, description="an accelerate YAML, e.g. configs/accelerate/ddp.yaml")
    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int = Field(29500, ge=1, le=65535)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    cpu_ddp: bool = Field(False, description="several CPU processes with gloo (accelerate --multi_gpu)")


class PipelineConfig(RunConfig):
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_unique(text: str):
    """yaml.safe_load, but a duplicate key is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the location `loc` (for did-you-mean lookups)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def format_validation_error(err: ValidationError, source: str, schema: type[BaseModel] = PipelineConfig) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    dotted = ".".join(str(p) for p in loc)
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if e["type"] == "extra_forbidden":
        owner = _model_at(schema, loc[:-1])
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.6)
            if close:
                prefix = ".".join(str(p) for p in loc[:-1])
                hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
        return f"config error: {source}: unknown key '{dotted}'{hint}{extra}"
    msg = e["msg"].replace("Value error, ", "")
    got = e.get("input")
    got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"config error: {source}: '{dotted}': {msg}{got_s}{extra}"


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type[BaseModel] = PipelineConfig) -> PipelineConfig:
    data: dict = {}
    source = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config error: {source}: is a folder, not a config file")
        if not p.is_file():
            raise ConfigError(f"config error: {source}: no such file")
        try:
            loaded = load_yaml_unique(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config error: {source}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {source}: not UTF-8 text") from None
        if loaded is None or loaded == {}:
            raise ConfigError(f"config error: {source}: the file has no settings (an empty config would silently "
                              f"run every default); start from configs/quickstart.yaml")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config error: {source}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
        data.setdefault("name", p.stem)
    # Start from the defaults so a dotted override into an unset section keeps its other fields.
    data = _deep_merge(schema().model_dump(mode="json"), data)
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    if overrides:
        source += " + overrides"
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, schema)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
