"""HF tensor names ↔ NNX paths: a table of rules, each with a transform that runs both ways.

A rule pairs HF name templates (after the table's prefix) with NNX path templates. `{i}` is the layer index
(`layers.3.mlp.up_proj.weight` ↔ `layers/3/mlp/up_proj/weight`; stacking layers for the scanned layout is
the loader's and exporter's business). `{e}` is an expert index found only on the HF side: per-expert
tensors become one stacked `[E, …]` NNX array. A transform maps the HF arrays of one rule instance (one
layer) to its NNX arrays (`load`, numpy on the host) and back (`save`, jax on device); both directions sit
side by side so an export is the exact inverse of a load.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.hf.safetensors import CheckpointError, Tensor


def _xp(x):
    """numpy for host arrays (loading), jax.numpy for device arrays and tracers (exporting)."""
    while isinstance(x, list):
        x = x[0]
    return np if isinstance(x, np.ndarray) else jnp


@dataclasses.dataclass(frozen=True)
class Transform:
    """`load(arrays, cfg)`: a rule's HF arrays in its `hf` order (a list where the name has `{e}`) → its NNX
    arrays in `nnx` order; `save` is the inverse. `cfg` (a ModelConfig) gives sizes, e.g. of fused parts."""

    name: str
    load: Callable[[list, Any], list]
    save: Callable[[list, Any], list]


RENAME = Transform("rename", lambda xs, cfg: list(xs), lambda xs, cfg: list(xs))


def inverse(t: Transform) -> Transform:
    return Transform(f"inverse({t.name})", t.save, t.load)


def chain(*ts: Transform) -> Transform:
    """`ts` applied in order on load, undone in reverse order on export."""

    def load(xs, cfg):
        for t in ts:
            xs = t.load(xs, cfg)
        return xs

    def save(xs, cfg):
        for t in reversed(ts):
            xs = t.save(xs, cfg)
        return xs

    return Transform(" then ".join(t.name for t in ts), load, save)


def transpose(*axes: int) -> Transform:
    """Each array permuted by `axes` on load (e.g. a `[in, out]` checkpoint for our `[out, in]`)."""
    back = tuple(int(a) for a in np.argsort(axes))
    return Transform(f"transpose{axes}", lambda xs, cfg: [x.transpose(axes) for x in xs],
                     lambda xs, cfg: [x.transpose(back) for x in xs])


def split(axis: int, sizes: int | Callable[[Any], Sequence[int]]) -> Transform:
    """One HF tensor → several NNX tensors along `axis` (Phi-3's `qkv_proj` → q/k/v); export concatenates.
    `sizes` is a count of equal parts or `cfg → part sizes`."""

    def load(xs, cfg):
        (x,) = xs
        if isinstance(sizes, int):
            return list(_xp(x).split(x, sizes, axis=axis))
        parts = tuple(sizes(cfg))
        if sum(parts) != x.shape[axis]:
            raise ValueError(f"split(axis={axis}): parts {parts} do not add up to the tensor's {x.shape[axis]}")
        return list(_xp(x).split(x, np.cumsum(parts)[:-1].tolist(), axis=axis))

    return Transform(f"split(axis={axis})", load, lambda xs, cfg: [_xp(xs).concatenate(xs, axis=axis)])


def fuse(axis: int, sizes: int | Callable[[Any], Sequence[int]]) -> Transform:
    """Several HF tensors → one NNX tensor along `axis` (e.g. gate and up as one matmul); export splits it."""
    return inverse(split(axis, sizes))


def _stack(xs, cfg):
    return [_xp(x).stack(x) for x in xs]


def _unstack(xs, cfg):
    return [[x[e] for e in range(x.shape[0])] for x in xs]


# Per-expert HF tensors (`experts.{e}.w1.weight`) ↔ one `[E, …]` NNX array.
STACK = Transform("stack", _stack, _unstack)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    nnx: tuple[str, ...]
    transform: Transform = RENAME
    head: bool = False  # named under the table's head prefix, not its body prefix (lm_head)


def _as_path(template: str) -> str:
    return template.replace(".{e}", "").replace(".", "/")


def rule(hf: str | Sequence[str], nnx: str | Sequence[str] | None = None, transform: Transform = RENAME, *,
         head: bool = False) -> Rule:
    """A rule; NNX paths default to the HF names as paths (`layers.{i}.x.weight` → `layers/{i}/x/weight`,
    any expert index dropped), which keeps HF names visible in the Flax tree."""
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    nnx = tuple(map(_as_path, hf)) if nnx is None else (nnx,) if isinstance(nnx, str) else tuple(nnx)
    return Rule(hf, nnx, transform, head)


def renames(*names: str, head: bool = False) -> tuple[Rule, ...]:
    return tuple(rule(n, head=head) for n in names)


class Hit(NamedTuple):
    rule: int
    slot: int
    layer: int | None
    expert: int | None


def _compile(template: str) -> re.Pattern:
    rx = re.escape(template)
    for key in ("i", "e"):
        rx = rx.replace(re.escape(f"{{{key}}}"), rf"(?P<{key}>\d+)")
    return re.compile(rx)


def _hit(m: re.Match, rule_i: int, slot: int) -> Hit:
    g = {k: int(v) for k, v in m.groupdict().items()}
    return Hit(rule_i, slot, g.get("i"), g.get("e"))


class Table:
    """A family's rules and name prefixes: `prefix` precedes every body name (`model.`, or e.g.
    `model.language_model.` in a multimodal checkpoint), `head_prefix` every `head` rule's name."""

    def __init__(self, rules: Iterable[Rule], prefix: str = "model.", head_prefix: str = ""):
        self.rules, self.prefix, self.head_prefix = tuple(rules), prefix, head_prefix
        hf = [(self._full(r, t), i, k) for i, r in enumerate(self.rules) for k, t in enumerate(r.hf)]
        nnx = [(t, i, k) for i, r in enumerate(self.rules) for k, t in enumerate(r.nnx)]
        for side, names in (("HF name", hf), ("NNX path", nnx)):
            seen = [n for n, _, _ in names]
            dup = {n for n in seen if seen.count(n) > 1}
            if dup:
                raise ValueError(f"tensor table: {side} {sorted(dup)[0]!r} appears in more than one rule")
        for r in self.rules:
            layered = {"{i}" in t for t in r.hf + r.nnx}
            if len(layered) > 1 or any("{e}" in t for t in r.nnx):
                raise ValueError(f"tensor table rule {r.hf} → {r.nnx}: `{{i}}` must be on every name or none, "
                                 "and `{e}` only on HF names")
        self._hf = [(_compile(n), i, k) for n, i, k in hf]
        self._nnx = [(_compile(n), i, k) for n, i, k in nnx]

    def _full(self, r: Rule, template: str) -> str:
        return (self.head_prefix if r.head else self.prefix) + template

    def match_hf(self, name: str) -> Hit | None:
        for rx, i, k in self._hf:
            m = rx.fullmatch(name)
            if m:
                return _hit(m, i, k)
        return None

    def match_nnx(self, path: tuple) -> Hit | None:
        """The rule slot of a per-layer NNX path (`('layers', 3, 'mlp', 'up_proj', 'weight')`)."""
        key = "/".join(map(str, path))
        for rx, i, k in self._nnx:
            m = rx.fullmatch(key)
            if m:
                return _hit(m, i, k)
        return None

    def hf_name(self, rule_i: int, slot: int, layer: int | None = None, expert: int | None = None) -> str:
        name = self._full(self.rules[rule_i], self.rules[rule_i].hf[slot])
        for key, value in (("{i}", layer), ("{e}", expert)):
            name = name if value is None else name.replace(key, str(value))
        return name

    def nnx_path(self, rule_i: int, slot: int, layer: int | None = None) -> tuple:
        return tuple(layer if p == "{i}" else p for p in self.rules[rule_i].nnx[slot].split("/"))

    def nnx_paths(self, rule_i: int, layer: int | None = None) -> list[tuple]:
        return [self.nnx_path(rule_i, k, layer) for k in range(len(self.rules[rule_i].nnx))]

    def hf_name_of(self, path: tuple) -> str:
        """The HF name of a one-to-one NNX parameter (so LoRA can name modules as PEFT does)."""
        key, hit = "/".join(map(str, path)), self.match_nnx(path)
        if hit is None:
            raise KeyError(f"no HF name for NNX path {key!r}")
        r = self.rules[hit.rule]
        if len(r.hf) != 1 or len(r.nnx) != 1 or "{e}" in r.hf[0]:
            raise KeyError(f"NNX path {key!r} is one part of the {r.transform.name} rule for {r.hf}; "
                           "it has no HF name of its own")
        return self.hf_name(hit.rule, 0, hit.layer)

    def load_arrays(self, rule_i: int, arrays: list, cfg) -> list:
        r = self.rules[rule_i]
        return _counted(r, r.transform.load(arrays, cfg), r.nnx)

    def save_arrays(self, rule_i: int, arrays: list, cfg) -> list:
        r = self.rules[rule_i]
        out = _counted(r, r.transform.save(arrays, cfg), r.hf)
        for template, x in zip(r.hf, out):
            if ("{e}" in template) != isinstance(x, list):
                raise ValueError(f"tensor table rule {r.hf}: {r.transform.name} must give a list of experts "
                                 f"exactly where the HF name has {{e}} ({template!r})")
        return out


def _counted(r: Rule, out: list, names: tuple) -> list:
    if len(out) != len(names):
        raise ValueError(f"tensor table rule {r.hf} → {r.nnx}: {r.transform.name} gave {len(out)} arrays "
                         f"for {len(names)} names")
    return out


class Gather:
    """Collects checkpoint tensors rule by rule: a rule runs once it has all its HF tensors, and a rule with
    per-expert tensors at `finish` (the expert count is what the checkpoint holds)."""

    def __init__(self, table: Table, cfg, source: str):
        self.table, self.cfg, self.source = table, cfg, source
        self._pending: dict[tuple[int, int | None], dict[int, Any]] = {}

    def add(self, hit: Hit, arr) -> list[tuple[tuple, Any]]:
        """Take one HF tensor; returns the `(per-layer NNX path, array)` pairs it completes, often none."""
        slots = self._pending.setdefault((hit.rule, hit.layer), {})
        if hit.expert is None:
            slots[hit.slot] = arr
        else:
            slots.setdefault(hit.slot, {})[hit.expert] = arr
        r = self.table.rules[hit.rule]
        if len(slots) < len(r.hf) or any("{e}" in t for t in r.hf):
            return []
        return self._run(hit.rule, hit.layer)

    def finish(self) -> list[tuple[tuple, Any]]:
        return [pair for key in list(self._pending) for pair in self._run(*key)]

    def _run(self, rule_i: int, layer: int | None) -> list[tuple[tuple, Any]]:
        t, slots = self.table, self._pending.pop((rule_i, layer))
        names = [t.hf_name(rule_i, k, layer) for k in range(len(t.rules[rule_i].hf))]
        missing = [n for k, n in enumerate(names) if k not in slots]
        if missing:
            raise CheckpointError(f"{self.source}: has {[n for n in names if n not in missing]} but lacks "
                                  f"{missing}, which the {t.rules[rule_i].transform.name} rule needs with it")
        arrays = [self._experts(names[k], slots[k]) if isinstance(slots[k], dict) else slots[k]
                  for k in range(len(names))]
        return list(zip(t.nnx_paths(rule_i, layer), t.load_arrays(rule_i, arrays, self.cfg)))

    def _experts(self, name: str, found: dict[int, Any]) -> list:
        if sorted(found) != list(range(len(found))):
            raise CheckpointError(f"{self.source}: {name} found for experts {sorted(found)}, "
                                  f"expected 0..{len(found) - 1}")
        return [found[e] for e in range(len(found))]


class _Outputs:
    """A rule instance's HF arrays, computed once and handed out one by one: tensors are written in order,
    so at most one rule's outputs are held at a time."""

    def __init__(self, compute: Callable[[], list]):
        self._compute, self._outs = compute, None

    def take(self, k: int):
        if self._outs is None or self._outs[k] is None:
            self._outs = jax.tree.leaves(self._compute())
        out, self._outs[k] = self._outs[k], None
        if all(o is None for o in self._outs):
            self._outs = None
        return out


def hf_outputs(table: Table, entries: Iterable[tuple[tuple, Callable, Any]], cfg) -> list[Tensor]:
    """Lazy HF tensors from `(per-layer NNX path, make, jax.ShapeDtypeStruct)` per parameter (`make()` gives
    the array): shapes come from tracing each transform, bytes only when a tensor is written."""
    groups: dict[tuple[int, int | None], dict[int, tuple]] = {}
    for path, make, struct in entries:
        hit = table.match_nnx(path)
        if hit is None:
            raise KeyError(f"no HF name for NNX path {'/'.join(map(str, path))!r}")
        groups.setdefault((hit.rule, hit.layer), {})[hit.slot] = (make, struct)
    return [t for (rule_i, layer), slots in groups.items() for t in _rule_outputs(table, rule_i, layer, slots, cfg)]


def _rule_outputs(table: Table, rule_i: int, layer: int | None, slots: dict, cfg) -> list[Tensor]:
    r = table.rules[rule_i]
    paths = ["/".join(map(str, p)) for p in table.nnx_paths(rule_i, layer)]
    missing = [p for k, p in enumerate(paths) if k not in slots]
    if missing:
        raise ValueError(f"model has {[p for p in paths if p not in missing]} but not {missing}: the "
                         f"{r.transform.name} rule writes {r.hf} from all of them")
    makes, structs = zip(*(slots[k] for k in range(len(r.nnx))))
    shapes = jax.eval_shape(lambda *xs: table.save_arrays(rule_i, list(xs), cfg), *structs)
    names = [table.hf_name(rule_i, k, layer, e) for k, s in enumerate(shapes)
             for e in (range(len(s)) if isinstance(s, list) else [None])]
    outputs = _Outputs(lambda: table.save_arrays(rule_i, [make() for make in makes], cfg))
    return [Tensor(name, s.shape, s.dtype, functools.partial(outputs.take, k))
            for k, (name, s) in enumerate(zip(names, jax.tree.leaves(shapes)))]


def to_nnx(table: Table, tensors: dict[str, Any], cfg=None) -> dict[tuple, Any]:
    """A whole HF state dict → NNX arrays by per-layer path: the loader's mapping, without placement."""
    gather, out = Gather(table, cfg, "state dict"), {}
    for name, arr in tensors.items():
        hit = table.match_hf(name)
        if hit is None:
            raise KeyError(f"tensor {name!r} matches no rule of the table")
        out.update(gather.add(hit, arr))
    out.update(gather.finish())
    return out


def to_hf(table: Table, arrays: dict[tuple, Any], cfg=None) -> dict[str, np.ndarray]:
    """NNX arrays by per-layer path → the HF state dict: the exporter's mapping, without files."""
    entries = [(p, lambda a=a: a, jax.ShapeDtypeStruct(np.shape(a), a.dtype)) for p, a in arrays.items()]
    return {t.name: t.numpy() for t in hf_outputs(table, entries, cfg)}
