"""The only module that knows Hydra: compose a command's config from conf/ and turn Hydra's errors into one line."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from iouctl import schema
from iouctl.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COMMAND_CONFIGS = {  # CLI command -> primary config file in conf/
    "train": "train", "eval": "eval", "nms-ablate": "nms_ablate", "refine": "refine",
    "bench-pool": "bench_pool", "data": "data", "demo": "demo",
}

_registered = False


def _register_schemas() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, options in schema.GROUP_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    for name, node in schema.PRIMARY_SCHEMAS.items():
        cs.store(group="schema", name=name, node=node)
    _registered = True


def group_options(group: str) -> list[str]:
    """The option files of a config group, e.g. group_options("model") -> ["faster_rcnn", "iou_net", ...]."""
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def compose(command: str, overrides: Sequence[str] = (), allow_missing: bool = False,
            choices: dict | None = None) -> DictConfig:
    """Compose the primary config of `command` with Hydra overrides; raise ConfigError (one line) when invalid.

    allow_missing: keep required values that are still `???` (for printing the config) instead of failing.
    choices: a dict filled with the option chosen in each config group ({"model": "iou_net", "experiment": None,
    ...}: Hydra's runtime.choices), which a run records so that a later command restores it (overrides_restoring).
    """
    if command not in COMMAND_CONFIGS:
        raise ConfigError(f"unknown command {command!r}; valid: {', '.join(COMMAND_CONFIGS)}")
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config folder {CONF_DIR} is missing; install iouctl from a source checkout (pip install -e .)")
    _register_schemas()
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=f"iouctl_{command}"):
            cfg = hydra_compose(config_name=COMMAND_CONFIGS[command], overrides=overrides, return_hydra_config=True)
            if choices is not None:
                chosen = OmegaConf.to_container(cfg.hydra.runtime.choices)
                choices.clear()
                choices.update({g: chosen[g] for g in groups() if g in chosen})  # not hydra/* nor schema/*
            cfg = _resolved(cfg)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option_message(exc)) from None
    except OverrideParseException:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        def parses(o: str) -> bool:
            try:
                OverridesParser.create().parse_overrides([o])
            except OverrideParseException:
                return False
            return True

        bad = next((o for o in overrides if not parses(o)), "")
        key, eq, value = bad.partition("=")
        example = f"{key}=\"{value}\"" if eq and key and (key + value).isprintable() else "key=\"a value\""
        raise ConfigError(f"cannot parse override {bad!r}: use key=value, group=option, +new_key=value or ~key; "
                          f"quote a value holding brackets, spaces or other special characters, e.g. '{example}' "
                          f"(single quotes for the shell)") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_composition_message(exc, command, overrides)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing and not allow_missing:
        raise ConfigError(f"missing required value(s) {', '.join(missing)}: give them as overrides, e.g. "
                          f"{missing[0]}=...")
    check_values(cfg, command, overrides)
    _absolute_paths(cfg)
    return cfg


# Keys naming a file or folder that a later command restores from the run's config.yaml: recorded absolute, so
# `iouctl nms-ablate run=<run>` from another folder finds the data the run used. `imagenet` names the hub cache.
_PATH_KEYS = ("data.root", "model.pretrained", "model.init_from")
_NOT_PATHS = ("imagenet",)


def _absolute_paths(cfg: DictConfig) -> None:
    import os

    for key in _PATH_KEYS:
        if OmegaConf.select(cfg, key, default=None, throw_on_missing=False) is None or OmegaConf.is_missing(
                OmegaConf.select(cfg, key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]):
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value and value not in _NOT_PATHS:
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(value)), merge=False)


def _resolved(cfg: DictConfig) -> DictConfig:
    """Resolve every interpolation now (${hydra:runtime.choices.model}, ${oc.env:...}, ${paths.cache_dir}): they would
    otherwise fail late and cryptically, and the run's config.yaml must record the values used. Drops `hydra`."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # keeps its own copy for the ${hydra:...} resolver
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return cfg


# --- valid values: what iouctl.schema declares with key() ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
    """A range as the schema writes it: "[1, inf)", "(0, 1]". NaN is in none."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])", text)
        if not m:
            raise ValueError(f"not an interval: {text!r}")
        return cls(float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]")

    def __contains__(self, x: float) -> bool:
        above = self.low < x or (self.low_closed and x == self.low)
        return above and (x < self.high or (self.high_closed and x == self.high))

    def describe(self) -> str:
        lo, hi = math.isfinite(self.low), math.isfinite(self.high)
        if lo and hi:
            left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if lo:
            return f"{'>=' if self.low_closed else '>'} {_num(self.low)}"
        if hi:
            return f"{'<=' if self.high_closed else '<'} {_num(self.high)}"
        return "any value"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _show(value: Any) -> str:
    """A value as the user would type it in an override."""
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choices(meta: dict) -> tuple:
    if "group" in meta:
        return tuple(o.replace("_", meta["sep"]) for o in group_options(meta["group"]))
    return tuple(meta.get("choices", ()))


def _valid_one(value: Any, meta: dict) -> bool:
    """Whether one value (a scalar, or one entry of a list key) is valid."""
    if value in meta.get("also", ()):
        return True
    choices = _choices(meta)
    if choices:
        return isinstance(value, str) and any(
            value == c or (c.endswith(":N") and value.startswith(c[:-1]) and value[len(c) - 1:].isdigit())
            for c in choices)
    if "range" in meta:
        return _is_number(value) and value in Interval.parse(meta["range"])
    return True


def _describe(meta: dict, integer: bool, optional: bool) -> str:
    """What is valid, in words: "an integer >= 1", "a finite number in (0, 1]", "one of cls, iou, fused"."""
    choices = _choices(meta)
    if choices:
        text = f"one of {', '.join(choices)}"
    elif "range" in meta:
        text = f"{'an integer' if integer else 'a finite number'} {Interval.parse(meta['range']).describe()}"
    else:
        text = "any value"
    text += "".join(f" or {a}" for a in meta.get("also", ()))
    return text + (" or null" if optional else "")


def _entries(n: Interval) -> str:
    count = n.describe().replace(">=", "at least") if n.low != n.high else f"exactly {_num(n.low)}"
    return f"{count} {'entry' if n.low == n.high == 1 or count == 'at least 1' else 'entries'}"


def check_values(cfg: DictConfig, command: str, overrides: Sequence[str] = ()) -> None:
    """Hold every value of a composed config to what iouctl.schema declares: a key the schema does not have (added
    with `+key=`), a value out of its range or choices, a broken cross-key rule is a ConfigError naming the key, the
    value and what is valid. Values still missing (`???`) are skipped."""
    _check_node(cfg, "", command, [o for o in overrides if _is_group_choice(o)])


def _check_node(node: DictConfig, prefix: str, command: str, choices: list[str]) -> None:
    typ = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(typ):
        return
    fields = {f.name: f for f in dataclasses.fields(typ)}
    for name in node.keys():
        if name not in fields:
            raise ConfigError(_unknown_key_message(command, f"{prefix}{name}", choices))
    for name, f in fields.items():
        if name not in node or OmegaConf.is_missing(node, name):
            continue
        value = node[name]
        if isinstance(value, DictConfig):
            _check_node(value, f"{prefix}{name}.", command, choices)
        elif f.metadata and value is not None:
            integer = re.search(r"\bint\b", str(f.type)) is not None  # the annotation: int, List[int], Optional[int]
            _check_value(f"{prefix}{name}", value, f.metadata, integer, optional=f.default is None)
    for low, high, gap in getattr(typ, "ORDERED", ()):
        a, b = node.get(low), node.get(high)
        if _is_number(a) and _is_number(b) and not a + gap <= b:
            rule = f"{prefix}{low}{f' + {gap}' if gap else ''} <= {prefix}{high}"
            raise ConfigError(f"{prefix}{low}={_show(a)} and {prefix}{high}={_show(b)} are not valid together; "
                              f"valid: {rule}")


def _check_value(key: str, value: Any, meta: dict, integer: bool, optional: bool) -> None:
    if not OmegaConf.is_list(value):
        if not _valid_one(value, meta):
            raise ConfigError(f"{key}={_show(value)} is not valid; valid: {_describe(meta, integer, optional)}")
        return
    items = list(value)
    if "size" in meta and len(items) not in Interval.parse(meta["size"]):
        raise ConfigError(f"{key}={_show(items)} is not valid; valid: {_entries(Interval.parse(meta['size']))}")
    bad = [v for v in items if not _valid_one(v, meta)]
    if bad:
        raise ConfigError(f"{key}={_show(items)} is not valid (entry {_show(bad[0])}); valid: each entry "
                          f"{_describe(meta, integer, False)}")
    order = meta.get("order")
    pairs = list(zip(items, items[1:]))
    if order == "increasing" and not all(a < b for a, b in pairs):
        raise ConfigError(f"{key}={_show(items)} is not valid; valid: increasing values")
    if order == "nondecreasing" and not all(a <= b for a, b in pairs):
        raise ConfigError(f"{key}={_show(items)} is not valid; valid: [min, max] with min <= max")


def _missing_option_message(exc: Exception) -> str:
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", str(exc))
    if m:
        group, option = m.group(1), m.group(2)
        valid = group_options(group)
        return f"unknown option {option!r} for config group {group!r}; valid: {', '.join(valid) or '(none)'}"
    m = re.search(r"Could not load '([^']+)'", str(exc))
    if m:
        return f"no config named {m.group(1)!r}; groups are: {', '.join(groups())}"
    return _one_line(str(exc))


def _composition_message(exc: Exception, command: str, overrides: list[str]) -> str:
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    m = re.search(r"In '(experiment)/([^']+)'.*?not in .*?full_key: (\S+)", text, re.S)
    if m:  # an experiment file setting a key the chosen group option lacks (experiment=tiny with data=coco)
        group, leaf = m.group(3).rpartition(".")[0].split(".")[0], m.group(3).split(".", 1)[-1]
        has = [o for o in group_options(group) if leaf in (OmegaConf.load(CONF_DIR / group / f"{o}.yaml") or {})]
        chosen = next((o.lstrip("+~") for o in overrides if o.partition("=")[0].lstrip("+~") == group),
                      f"the chosen {group} option")
        return (f"{m.group(1)}={m.group(2)} sets {m.group(3)}, which {chosen} does not have; that experiment is for"
                f" {' or '.join(f'{group}={o}' for o in has) or 'another ' + group + ' option'}")
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if m and _keys_at(command, m.group(1).rpartition(".")[0], []).count(m.group(1).rpartition(".")[2]):
        given = next((o for o in overrides if o.split("=", 1)[0].lstrip("+") == m.group(1)), f"+{m.group(1)}=...")
        return f"config key {m.group(1)!r} exists already: set it without '+', as {given.lstrip('+')}"
    m = re.search(r"Could not override '([^']+)'", text) or \
        re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if m or (cause and "not in struct" in str(cause)) or "Key '" in text and "not in struct" in text:
        key = m.group(1) if m else _key_from(str(cause or text))
        return _unknown_key_message(command, key, [o for o in overrides if _is_group_choice(o)])
    m = re.search(r"Error merging override (\S+)", text)
    if m and cause is not None:
        key = getattr(cause, "full_key", None) or m.group(1).split("=")[0].lstrip("+~")
        reason = _one_line(str(cause).split("\n")[0])
        return f"invalid value in override {m.group(1)!r} for key {key!r}: {reason}"
    return _one_line(text + (f" ({cause})" if cause else ""))


def _key_from(text: str) -> str:
    m = re.search(r"full_key: (\S+)", text) or re.search(r"Key '([^']+)'", text)
    return m.group(1) if m else "?"


def _is_group_choice(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return "=" in override and "." not in key and (CONF_DIR / key).is_dir()


def _unknown_key_message(command: str, key: str, choices: list[str]) -> str:
    parent, _, leaf = key.rpartition(".")
    valid = _keys_at(command, parent, choices)
    where = f"under {parent!r}" if parent else "at the top level"
    hint = f"; valid keys {where}: {', '.join(valid)}" if valid else ""
    return f"unknown config key {key!r} for `iouctl {command}`{hint}"


def _keys_at(command: str, parent: str, choices: list[str]) -> list[str]:
    """The keys under `parent` with the user's group choices applied (model=... changes the model's keys)."""
    try:
        cfg = compose(command, choices, allow_missing=True)
    except ConfigError:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def to_yaml(cfg: DictConfig, resolve: bool = True) -> str:
    return OmegaConf.to_yaml(cfg, resolve=resolve)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Build an object from a config node with `_target_` (None stays None).

    A constructor tells a bad config value apart from a bug by what it raises: an IouctlError (ConfigError) is the
    user's (one line, exit 2); anything else (a ValueError from a shape inside torchvision, a TypeError) is a bug and
    keeps its traceback. Hydra's own errors (no such _target_, an interpolation that does not resolve) are one line.
    """
    if node is None:
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate
    from omegaconf.errors import OmegaConfBaseException

    from iouctl.errors import IouctlError

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, IouctlError):
            raise cause from None
        # Hydra words the error of the call itself so (hydra/_internal/instantiate/_instantiate2.py, 1.3); the
        # others are about the config: a target that does not import, arguments that do not collect
        if cause is not None and str(exc).startswith(("Error in call to target", "Error in creating partial")):
            raise cause from None  # the constructor's own error: a bug, with the constructor's traceback
        text = str(exc).replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception", "")
        raise ConfigError(_one_line(text + (f" ({type(cause).__name__}: {cause})" if cause is not None else ""))) \
            from None
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise ConfigError(f"{_target_of(node)}: {_one_line(str(exc))}") from None



# Model keys for the post-processing (conf/model/*.yaml: the model's own inference), not constructor arguments
POSTPROCESS_KEYS = ("inference", "cls_weight")


def instantiate_model(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate` of a model config without POSTPROCESS_KEYS; of `kwargs` (what the engine has for any detector,
    e.g. the RoI pool) only those its constructor takes."""
    import inspect

    from hydra.utils import get_method

    try:
        params = inspect.signature(get_method(str(node._target_))).parameters
    except Exception:  # noqa: BLE001 -- a target that does not resolve: instantiate says so in one line
        params = kwargs
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return instantiate(OmegaConf.masked_copy(node, [k for k in node if k not in POSTPROCESS_KEYS]), **kwargs)


def _target_of(node: Any) -> str:
    return str(node.get("_target_", "?")) if hasattr(node, "get") else "?"


def overrides_restoring(command: str, saved: dict, groups: Sequence[str], given: Sequence[str],
                        choices: dict | None = None, saved_overrides: Sequence[str] = ()) -> list[str]:
    """Overrides that bring a run's `groups` (e.g. model, data, pool) back into `command`'s config, from what the run
    recorded: the option it chose in each group (`choices`; for a run that recorded none, the option file closest to
    its config), its own overrides of those groups (`saved_overrides`), then its value (`saved`, its config.yaml) of
    each key that still comes out different (an experiment's setting, a default changed since the run), and its
    name unless a group is chosen anew. A key the option has gained since the run takes that option's default. What the user's own overrides
    `given` set is left to them: a group chosen anew keeps that option's values."""
    keys = [_override_key(o) for o in given]

    def given_sets(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in keys)

    restored = [g for g in groups if g not in keys and isinstance(saved.get(g), dict)]
    out = []
    for group in restored:
        option = choices.get(group) if choices is not None else _closest_option(group, saved[group])
        if option is not None:
            out.append(f"{group}={option}")
        out += [o for o in saved_overrides if _override_key(o).startswith(group + ".") and not given_sets(
            _override_key(o))]
    if restored:
        now = compose(command, [*out, *given], allow_missing=True)
        for group in restored:
            have = leaves(OmegaConf.to_container(now[group]) if group in now else None, group)
            out += [f"{k}={_override_value(v)}" for k, v in leaves(saved[group], group).items()
                    if k in have and have[k] != v and not given_sets(k)]  # a key the code no longer has: dropped
    anew = [g for g in groups if g in keys and isinstance(saved.get(g), dict)]
    if "name" in saved and "name" not in keys and not anew:  # model=faster_rcnn on an iou_net run: not "iou_net"
        out.append(f"name={_override_value(saved['name'])}")
    return out


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def leaves(d: Any, prefix: str) -> dict[str, Any]:
    """{"model.a.b": leaf} of a nested dict `d` under `prefix` (lists and empty dicts are leaves)."""
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(leaves(v, f"{prefix}.{k}"))
    return out


def _closest_option(group: str, node: dict) -> str:
    """For a run that recorded no group choices: the option file of `group` with the run's `_target_` whose values
    differ from the run's at the fewest keys (iou_net, not faster_rcnn, for a Faster R-CNN with an IoU head)."""
    target, best = node.get("_target_"), None
    for option in group_options(group):
        values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
        if not isinstance(values, dict) or values.get("_target_") != target:
            continue
        differing = sum(values.get(k) != v for k, v in node.items())
        if best is None or differing < best[0]:
            best = (differing, option)
    if best is None:
        raise ConfigError(f"{group} target {target} matches no option of conf/{group}/")
    return best[1]


def _override_value(value: Any) -> str:
    """A YAML value as Hydra override syntax (JSON for strings and lists: quoted, escaped)."""
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return str(value)


def option_node(group: str, option: str) -> DictConfig:
    """One option file of a config group composed alone, typed by its schema: e.g. option_node("nms", "greedy")."""
    if option not in group_options(group):
        raise ConfigError(f"{group} option {option!r} is not in conf/{group}/; valid: {', '.join(group_options(group))}")
    _register_schemas()
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name=f"iouctl_{group}"):
        return hydra_compose(config_name=None, overrides=[f"+{group}={option}"])[group]


def grid_arms(conf: DictConfig) -> list[DictConfig]:
    """The arm configs of `iouctl nms-ablate`: each option of `conf.grid` (an nms option file) times every combination
    of its swept values, in the grid's order (the last key varies fastest); filtered by conf.methods / scores /
    iou_thresholds and given conf.max_per_image. An option may hold a list of sweeps (each expanded in turn); an option
    in `methods` that the grid does not sweep runs once with its file's settings. A key that is not the option's, or
    a value out of its range, is a ConfigError."""
    grid = OmegaConf.to_container(conf.grid) if conf.grid is not None else {}
    shapes_ok = isinstance(grid, dict) and all(
        v is None or isinstance(v, dict) or (isinstance(v, list) and all(isinstance(s, dict) for s in v))
        for v in grid.values())
    if not shapes_ok:
        raise ConfigError("grid must map nms options to {key: [values]} (or a list of such sweeps), e.g. "
                          "grid.greedy={iou_threshold: [0.5, 0.6]}")
    wanted = [m.replace("-", "_") for m in conf.methods] if conf.methods is not None else list(grid)
    arms = []
    for option in wanted:
        base = option_node("nms", option)
        sweeps = grid.get(option) or {}
        for one in (sweeps if isinstance(sweeps, list) else [sweeps]):
            arms += _sweep_arms(conf, option, base, one)
    return arms


def _sweep_arms(conf: DictConfig, option: str, base: DictConfig, one: dict) -> list[DictConfig]:
    """The arms of one sweep {key: [values]} of nms option `option` (its composed file: `base`)."""
    import itertools

    sweep = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in one.items()}
    for key in sweep:
        if key not in base:
            raise ConfigError(f"grid.{option}.{key}: nms option {option} has no key {key}; its keys: "
                              f"{', '.join(k for k in base if k != '_target_')}")
    if conf.scores is not None and "score" in base:
        sweep["score"] = list(conf.scores)
    if conf.iou_thresholds is not None and "iou_threshold" in sweep:
        sweep["iou_threshold"] = list(conf.iou_thresholds)
    arms = []
    for values in itertools.product(*sweep.values()):
        node = base.copy()
        for key, value in zip(sweep, values):
            try:
                node[key] = value
            except Exception as exc:  # noqa: BLE001 -- OmegaConf's type errors: a wrong value, one line
                raise ConfigError(f"grid.{option}.{key}={value!r}: {_one_line(str(exc))}") from None
        node["max_per_image"] = int(conf.max_per_image)
        _check_node(node, f"grid.{option}.", "nms-ablate", [])
        arms.append(node)
    return arms
