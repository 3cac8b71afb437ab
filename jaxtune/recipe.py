"""Training recipes: a YAML file → `RecipeConfig`, one dataclass per section, validated on load.

Unknown keys and wrong types fail with the file, line and key path (`quickstart.yaml:12: train.batch_sze:
unknown key`); `--set train.steps=50` overrides any key before validation. Sections: `model`, `data`
(`data.config.DataConfig`), `lora` (`lora.LoraConfig`, only with `train.mode: lora`), `optim`
(`train.optim.OptimConfig`), `train`, `mesh` (`{data: -1}` etc.), `output`, and `forgetting`
(optional, `eval.forgetting.ForgettingConfig`; checked every `train.forgetting_every` steps, with
`warn_at` / `stop_at` thresholds on the relative perplexity rise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxtune.data.config import DataConfig
from jaxtune.eval.forgetting import ForgettingConfig
from jaxtune.lora.config import LoraConfig
from jaxtune.model.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES
from jaxtune.model.sharding import MESH_AXES
from jaxtune.structs import from_dict, show, to_dict
from jaxtune.train.optim import OptimConfig

NAN_POLICIES = ("skip", "stop")


class ConfigError(ValueError):
    """A recipe that cannot run as written: names the file, line and key path, and what to change."""


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {msg}")


@dataclass(frozen=True)
class ModelSection:
    """`path`: HF model directory (relative to the working dir, else to the recipe). `dtype` is the compute
    dtype; `param_dtype` the storage dtype of the weights (default: float32 when `train.mode` is full, i.e.
    fp32 master weights for a bf16 run, else `dtype`). `add_special_tokens`: tokens the chat template needs
    that the base lacks or never trained; their embedding rows are trained too."""

    path: str
    tokenizer: str | None = None
    dtype: str = "float32"
    param_dtype: str | None = None
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    add_special_tokens: tuple[str, ...] = ()
    allow_pickle: bool = False

    def __post_init__(self):
        _need(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} is not one of {tuple(DTYPES)}")
        _need(self.param_dtype is None or self.param_dtype in DTYPES, "model.param_dtype",
              f"{self.param_dtype!r} is not one of {tuple(DTYPES)}")
        _need(self.remat in REMAT_POLICIES, "model.remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")
        _need(self.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
              f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")


@dataclass(frozen=True)
class TrainSection:
    """`mode`: lora | full (with `freeze`: dotted sub-paths kept frozen). `steps`: optimizer steps (null:
    `data.num_epochs` epochs; more steps than that add epochs). `batch_size`: global sequences per optimizer
    step, split into `optim.grad_accum_steps` micro-batches. `*_every`: in steps, 0 = only at the end
    (eval, save) or never (forgetting; a check at or above `forgetting.stop_at` ends the run early, with a
    checkpoint and the export). `keep_best` ranks by eval loss. `nan_policy`: skip a non-finite
    step (stop after `max_bad_steps` in a row) or stop at the first. `compile_cache`: keep compiled steps in
    JAX's persistent cache under `$JAXTUNE_CACHE_DIR/xla` (a cache dir set for JAX wins), so a re-run skips
    XLA compilation."""

    mode: str = "lora"
    freeze: tuple[str, ...] = ()
    steps: int | None = None
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 0
    eval_batches: int | None = None
    save_every: int = 0
    keep_last: int = 2
    keep_best: int = 1
    log_every: int = 10
    loss_chunk: int | None = None
    nan_policy: str = "skip"
    max_bad_steps: int = 5
    forgetting_every: int = 0
    async_checkpoint: bool = True
    compile_cache: bool = True

    def __post_init__(self):
        _need(self.mode in ("lora", "full"), "train.mode", f"{self.mode!r} is not 'lora' or 'full'")
        _need(self.nan_policy in NAN_POLICIES, "train.nan_policy", f"{self.nan_policy!r} is not one of {NAN_POLICIES}")
        _need(self.steps is None or self.steps >= 1, "train.steps", "must be >= 1 (or null for whole epochs)")
        _need(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        for name in ("eval_every", "save_every", "forgetting_every", "keep_best"):
            _need(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        for name in ("keep_last", "log_every", "max_bad_steps"):
            _need(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _need(self.eval_batches is None or self.eval_batches >= 1, "train.eval_batches", "must be >= 1 or null")
        _need(self.loss_chunk is None or self.loss_chunk >= 1, "train.loss_chunk", "must be >= 1 or null")


@dataclass(frozen=True)
class OutputSection:
    """`run_dir` (local) holds metrics.jsonl, tensorboard/, config.yaml, and by default checkpoints/ and (with
    `export`) export/{merged,adapter}. `checkpoint_dir` and `export_dir` move those elsewhere, e.g. to a
    `gs://bucket/…` URL that outlives a preemptible VM: `--resume` needs only the checkpoint dir (it holds the
    recipe), the run dir may be gone."""

    run_dir: str
    checkpoint_dir: str | None = None
    export: bool = False
    export_dir: str | None = None
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        _need("://" not in self.run_dir, "output.run_dir",
              f"{self.run_dir!r} is a URL; the run dir is local (metrics and TensorBoard are appended to): put "
              "checkpoints on it with output.checkpoint_dir and the export with output.export_dir")

    @property
    def checkpoints(self) -> str:
        """Where the run's checkpoints go: `checkpoint_dir`, else `RUN/checkpoints`."""
        return self.checkpoint_dir or str(Path(self.run_dir) / "checkpoints")

    @property
    def exports(self) -> str:
        """Where the run's export goes: `export_dir`, else `RUN/export`."""
        return self.export_dir or str(Path(self.run_dir) / "export")


@dataclass
class RecipeConfig:
    model: ModelSection
    data: DataConfig
    output: OutputSection
    lora: LoraConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: dict[str, int] = field(default_factory=lambda: {"data": -1})
    forgetting: ForgettingConfig | None = None

    def __post_init__(self):
        if self.train.mode == "lora" and self.lora is None:
            self.lora = LoraConfig()
        _need(not (self.train.mode == "full" and self.lora is not None), "lora",
              "a lora: section is set but train.mode is full; remove the section or set train.mode: lora")
        _need(not (self.train.mode == "lora" and self.train.freeze), "train.freeze",
              "applies to train.mode: full only (LoRA freezes the base already)")
        _need(not (self.lora is not None and self.lora.quantize and self.lora.quantize_scope == "all"
                    and self.model.add_special_tokens), "lora.quantize_scope",
              "'all' quantizes the embedding, which model.add_special_tokens must grow; use 'all-linear'")
        for axis, size in self.mesh.items():
            _need(axis in MESH_AXES, f"mesh.{axis}", f"unknown mesh axis; expected any of {MESH_AXES}")
            _need(size == -1 or size >= 1, f"mesh.{axis}", f"size {size} must be >= 1 or -1 (all remaining devices)")
        _need(list(self.mesh.values()).count(-1) <= 1, "mesh", "at most one axis may be -1")
        k = self.optim.grad_accum_steps
        _need(self.train.batch_size % k == 0, "train.batch_size",
              f"{self.train.batch_size} is not divisible by optim.grad_accum_steps={k}")
        chunk = self.train.loss_chunk
        _need(chunk is None or self.data.seq_len % chunk == 0, "train.loss_chunk",
              f"{chunk} must divide data.seq_len={self.data.seq_len}")
        _need(not self.train.forgetting_every or self.forgetting is not None, "train.forgetting_every",
              "needs a forgetting: section (an empty `forgetting: {}` uses the defaults)")

    @property
    def param_dtype(self) -> str:
        if self.model.param_dtype:
            return self.model.param_dtype
        return "float32" if self.train.mode == "full" else self.model.dtype


# ------------------------------------------------------------------------------------------- YAML + overrides


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2), not the string PyYAML's 1.1 rules give, and
    refuses a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for k, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(k)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]})", k.start_mark)
                seen[key] = k.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.2 booleans: only true/false. PyYAML's 1.1 rules read `off`, `no`, `on`, `yes` as booleans, so
# `method: off` would arrive as False.
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path → 1-based line in the YAML text, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    try:
        walk(yaml.compose(text, Loader=_Loader), "")
    except yaml.YAMLError:
        pass
    return lines


def _line_for(lines: dict[str, int], msg: str) -> int | None:
    m = re.match(r"[A-Za-z_][\w.]*", msg)
    path = m.group(0) if m else ""
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


def _arg(item: str) -> str:
    """A `--set` argument as typed, quoted when it holds line breaks or control characters."""
    return item if item.isprintable() else repr(item)


def _yaml_error(e: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line or None, PyYAML's problem on one line without its `in "<unicode string>"` blocks)."""
    if isinstance(e, yaml.reader.ReaderError):
        return text.count("\n", 0, e.position) + 1, f"character {e.character!r} is not allowed ({e.reason})"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if not isinstance(e, yaml.MarkedYAMLError):
        return None, " ".join(str(e).split())
    detail = " ".join(x for x in (e.context, e.problem) if x)
    return (mark.line + 1, f"{detail} (column {mark.column + 1})") if mark else (None, detail)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`["train.steps=50", "lora.rank=8"]` → values (parsed as YAML scalars/lists) set at those key paths.

    A missing or null section on the path is created; a path through a value that is not a mapping is an
    error, since setting it would silently drop that value."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        bad = next((p for p in parts if not p or p != p.strip() or not p.isprintable()), None)
        if not sep or bad is not None:
            raise ConfigError(f"--set {_arg(item)}: expected KEY.PATH=VALUE with non-empty keys joined by single "
                              f"dots, e.g. --set train.steps=50" + (f" (key component {bad!r})" if sep else ""))
        try:
            parsed = _load_yaml(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {_arg(item)}: value is not valid YAML: {_yaml_error(e, value)[1]}") from None
        node = raw
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            elif not isinstance(node[p], dict):
                raise ConfigError(f"--set {_arg(item)}: {'.'.join(parts[:i + 1])} is {show(node[p])}, not a "
                                  f"mapping, so it has no key {parts[i + 1]!r}")
            node = node[p]
        node[parts[-1]] = parsed
    return raw


def resolve_path(value: str, recipe_dir: Path) -> str:
    """Relative paths: the working directory first, then the recipe's directory; a name found in neither
    (e.g. a Hub id) is kept as written."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    beside = recipe_dir / p
    return str(beside) if beside.exists() else value


RECIPE_PATHS = (("model", ("path", "tokenizer")), ("data", ("train", "validation", "chat_template")),
                ("forgetting", ("base_text", "general_text", "probes")))


def _resolve_paths(raw: dict, recipe_dir: Path, paths=RECIPE_PATHS) -> dict:
    """Resolve the path-valued keys `paths` names: (dotted section, keys) pairs."""
    for section, keys in paths:
        sec = raw
        for part in section.split("."):
            sec = sec.get(part) if isinstance(sec, dict) else None
        if isinstance(sec, dict):
            for k in keys:
                if isinstance(sec.get(k), str):
                    sec[k] = resolve_path(sec[k], recipe_dir)
    return raw


def _blame(msg: str, overrides: list[str], lines: dict[str, int]) -> str | None:
    """The `--set` an error is about: one whose key path the error's path lies under, or one that introduced
    the error's key (a key or section absent from the YAML)."""
    m = re.match(r"[^\s:=]+", msg)
    err = m.group(0).split(".") if m else []
    for item in overrides:
        key = item.partition("=")[0].split(".")
        introduced = next((key[:i] for i in range(1, len(key) + 1) if ".".join(key[:i]) not in lines), None)
        if err[:len(key)] == key or (introduced and err[:len(introduced)] == introduced):
            return item
    return None


def load_config(path: str | Path, cls, overrides: list[str] | None = None, paths=RECIPE_PATHS):
    """Read a YAML file, apply `--set` overrides, resolve the path keys `paths` names and build dataclass
    `cls`; every error names the file and line (or the `--set` that caused it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        raw = _load_yaml(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        line, detail = _yaml_error(e, text)
        raise ConfigError(f"{path}{f':{line}' if line else ''}: not valid YAML: {detail}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model:, data:, train:, …)")
    overrides, lines = list(overrides or []), _key_lines(text)
    apply_overrides(raw, overrides)
    _resolve_paths(raw, path.resolve().parent, paths)
    try:
        return from_dict(cls, raw)
    except ValueError as e:
        msg = str(e)
        overridden, line = _blame(msg, overrides, lines), _line_for(lines, msg)
        where = f"--set {_arg(overridden)}" if overridden else (f"{path}:{line}" if line else str(path))
        raise ConfigError(f"{where}: {msg}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read, override, resolve paths and validate one training recipe file."""
    return load_config(path, RecipeConfig, overrides)


def run_exports(run_dir: str | Path) -> str:
    """Where a run's export went: the `output.export_dir` of the recipe it saved (`RUN/config.yaml`), else
    `RUN/export`."""
    saved = Path(run_dir) / "config.yaml"
    raw = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    output = raw.get("output") if isinstance(raw, dict) else None
    export_dir = output.get("export_dir") if isinstance(output, dict) else None
    return str(export_dir) if export_dir else str(Path(run_dir) / "export")


def run_quantization(run_dir: str | Path) -> LoraConfig | None:
    """The `lora:` section of the recipe a run saved when it trained against a quantized base (QLoRA), so a
    later merge can rebuild the base the adapter was trained on; None otherwise."""
    saved = Path(run_dir) / "config.yaml"
    raw = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    section = raw.get("lora") if isinstance(raw, dict) else None
    if not isinstance(section, dict) or not section.get("quantize"):
        return None
    return LoraConfig(**section)


def dump_recipe(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
