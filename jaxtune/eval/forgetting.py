"""Catastrophic-forgetting monitor: how far a tuned model drifts from its base on what the base could do.

Three signals, each measured on the base model first and reported as relative change against it:
- `base_ppl`: perplexity on held-out text of the base model's own domain. Without the pretraining data, that
  text is a fixed-seed set of samples drawn from the base model itself (its own distribution, by
  construction), saved with the run so every measurement of the run scores the same tokens.
- `general_ppl`: perplexity on a fixed slice of general text (tiny Shakespeare by default).
- `probe_agreement`: token-level agreement of greedy continuations of the base-task probes
  (`probes/base_tasks_v1.jsonl`) with the base model's recorded continuations (1.0 for the base itself).

`ForgettingMonitor.baseline(model)` runs once before training; `measure(model, step)` runs every N steps. With a
run dir, the samples, recorded probe outputs and baseline figures are written there, and a resumed run reloads
them instead of re-measuring a model that is no longer the base. `assess` turns one measurement into the
training log's line and, past `ForgettingConfig.stop_at`, the reason to stop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

from jaxtune.files import write_text_atomic
from jaxtune.jsonl import read_jsonl, write_jsonl

PROBES_DIR = Path(__file__).resolve().parent / "probes"
DEFAULT_BASE_PROBES = PROBES_DIR / "base_tasks_v1.jsonl"
GENERAL_TEXT_NAME = "tinyshakespeare_input.txt"
PREFIX = "forgetting/"


@dataclasses.dataclass(frozen=True)
class BaseProbe:
    id: str
    prompt: str
    kind: str = ""


def load_base_probes(path: str | os.PathLike | None = None) -> list[BaseProbe]:
    """Base-task probes from JSONL (`id`, `prompt`, optional `kind`); errors name the file, line and field."""
    path = Path(path) if path is not None else DEFAULT_BASE_PROBES
    if not path.is_file():
        raise FileNotFoundError(f"base-task probe file {path} does not exist")
    probes, seen = [], set()
    for n, rec in read_jsonl(path):
        for field in ("id", "prompt"):
            if not isinstance(rec.get(field), str) or not rec[field]:
                raise ValueError(f"{path}:{n}: field '{field}' must be a non-empty string")
        if rec["id"] in seen:
            raise ValueError(f"{path}:{n}: duplicate probe id {rec['id']!r}; ids must be unique")
        seen.add(rec["id"])
        probes.append(BaseProbe(rec["id"], rec["prompt"], rec.get("kind", "")))
    if not probes:
        raise ValueError(f"{path}: no probes (expected JSON lines with 'id' and 'prompt')")
    return probes


def token_agreement(reference: Sequence, candidate: Sequence) -> float:
    """Share of the reference's positions where the candidate has the same token (1.0 when both are empty)."""
    if not reference:
        return 1.0 if not candidate else 0.0
    return sum(a == b for a, b in zip(reference, candidate)) / len(reference)


def default_general_text() -> Path | None:
    from jaxtune.assets import find_asset

    return find_asset(f"data/{GENERAL_TEXT_NAME}")


THRESHOLDS = ("warn_at", "stop_at")  # act on the figures; they do not change what the baseline measures
PPL_NAMES = ("base_ppl", "general_ppl")


@dataclasses.dataclass(frozen=True)
class ForgettingConfig:
    """Sizes are small on purpose: the monitor runs inside training every N steps.

    `warn_at` / `stop_at` are thresholds on the relative perplexity rise over the base: the larger of
    `base_ppl_rel` and `general_ppl_rel` (when general text is available), e.g. 0.1 = +10%. At or above
    `warn_at` a training check logs a warning; at or above `stop_at` training stops early (checkpointed).
    None switches a threshold off."""

    n_samples: int = 16
    sample_tokens: int = 64
    seed: int = 0
    base_text: str | None = None  # held-out base-domain text file; replaces the self-samples when given
    general_text: str | None = None  # default: default_general_text()
    general_start: int = 0
    general_chars: int = 20_000
    seq_len: int = 128
    batch_size: int = 8
    max_windows: int = 16
    probes: str | None = None  # default: the packaged base_tasks_v1.jsonl
    probe_tokens: int = 24
    warn_at: float | None = None
    stop_at: float | None = None

    def __post_init__(self):
        for name in THRESHOLDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0 or math.isinf(value)):
                raise ValueError(f"forgetting.{name}: must be a number > 0 (a relative perplexity rise, e.g. 0.1 "
                                 f"for +10%) or null, got {value!r}")
        if self.warn_at is not None and self.stop_at is not None and self.warn_at > self.stop_at:
            raise ValueError(f"forgetting.warn_at: {self.warn_at} is above forgetting.stop_at {self.stop_at}; "
                             "the warning must come at or before the stop")


def _measured(config: dict) -> dict:
    """A config as the baseline depends on it: without the thresholds, which may change on resume."""
    return {k: v for k, v in config.items() if k not in THRESHOLDS}


def ppl_rise(result: dict) -> tuple[str, float] | None:
    """`(name, rise)` of the larger relative perplexity rise in a `measure` result (None without any)."""
    rises = [(name, result[PREFIX + name + "_rel"]) for name in PPL_NAMES if PREFIX + name + "_rel" in result]
    rises = [(n, r) for n, r in rises if not math.isnan(r)]
    return max(rises, key=lambda nr: nr[1]) if rises else None


def _pct(value: float) -> str:
    return f"{value * 100:g}%"


def assess(result: dict, cfg: ForgettingConfig, step: int) -> tuple[str, str | None]:
    """`(line, stop)` for one check: the log line, e.g. `forgetting @ step 100: base ppl 4.21 (+3.2%)  general ppl
    9.10 (+1.0%)  probe agreement 92%`, with a warning appended at or above `warn_at`; `stop` is why training
    should stop (at or above `stop_at`), else None."""
    parts = []
    for name in PPL_NAMES:
        if PREFIX + name in result:
            parts.append(f"{name.replace('_', ' ')} {result[PREFIX + name]:.2f} "
                         f"({result[PREFIX + name + '_rel'] * 100:+.1f}%)")
    if PREFIX + "probe_agreement" in result:
        parts.append(f"probe agreement {result[PREFIX + 'probe_agreement'] * 100:.0f}%")
    line = f"forgetting @ step {step}: " + "  ".join(parts)
    worst = ppl_rise(result)
    if worst is None:
        return line, None
    name, rise = worst
    what = f"{name.split('_')[0]} perplexity rose {rise * 100:.1f}%"
    if cfg.stop_at is not None and rise >= cfg.stop_at:
        reason = f"{what} ≥ forgetting.stop_at {_pct(cfg.stop_at)} at the forgetting check of step {step}"
        return f"{line} — STOP: {what} ≥ stop_at {_pct(cfg.stop_at)}", reason
    if cfg.warn_at is not None and rise >= cfg.warn_at:
        return f"{line} — WARNING: {what} ≥ warn_at {_pct(cfg.warn_at)}", None
    return line, None


def saved_config(run_dir: str | Path) -> ForgettingConfig | None:
    """The config a run's baseline was recorded with (None if the run has no baseline)."""
    path = Path(run_dir) / "forgetting" / "baseline.json"
    if not path.is_file():
        return None
    return ForgettingConfig(**_measured(json.loads(path.read_text())["config"]))


def _rel(value: float, base: float) -> float:
    return (value - base) / base if base else float("nan")


def _with_stop(tokens: list[int], reason: str) -> list:
    return list(tokens) + (["<stop>"] if reason == "stop" else [])


# What a recorded baseline is: `baseline.json` last, since its presence marks the baseline as recorded.
BASELINE_FILES = ("base_samples.jsonl", "base_probe_outputs.jsonl", "baseline.json")


def baseline_files(run_dir: str | Path) -> dict[str, str] | None:
    """The run dir's recorded baseline as text, file by file (None without one): each checkpoint carries it, so
    a resume whose run dir is gone (a preempted VM's disk) keeps measuring against the same base."""
    d = Path(run_dir) / "forgetting"
    if not (d / "baseline.json").is_file():
        return None
    return {name: (d / name).read_text() for name in BASELINE_FILES if (d / name).is_file()}


def restore_baseline(run_dir: str | Path, files: dict[str, str] | None) -> bool:
    """Write a checkpoint's baseline (`baseline_files`) into a run dir that has none; True when written."""
    d = Path(run_dir) / "forgetting"
    if not files or (d / "baseline.json").is_file():
        return False
    d.mkdir(parents=True, exist_ok=True)
    for name in BASELINE_FILES:
        if name in files:
            write_text_atomic(d / name, files[name])
    return True


class ForgettingMonitor:
    """`baseline(model)` once on the base, then `measure(model, step) -> {"forgetting/...": float}`."""

    def __init__(self, tokenizer, cfg: ForgettingConfig = ForgettingConfig(), *, run_dir: str | Path | None = None,
                 mesh=None):
        self.tokenizer, self.cfg, self.mesh = tokenizer, cfg, mesh
        self.dir = Path(run_dir) / "forgetting" if run_dir is not None else None
        self.probes = load_base_probes(cfg.probes)
        self.general_path = Path(cfg.general_text) if cfg.general_text else default_general_text()
        if self.general_path is None:
            warnings.warn(f"no general-text file given and {GENERAL_TEXT_NAME} not found under $JAXTUNE_ASSETS; "
                          "forgetting/general_ppl will be missing (set ForgettingConfig.general_text)")
        self.samples: list[list[int]] | None = None
        self.base_outputs: list[dict] | None = None
        self.base_metrics: dict | None = None
        self.history: list[dict] = []
        self.last_outputs: list[dict] = []
        self.resumed = False  # True when baseline() reloaded a recorded baseline (log it only on a fresh run)

    # -- the fixed evaluation sets ------------------------------------------------------------------------
    def _start_id(self) -> int:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start base-model samples from; "
                             "set ForgettingConfig.base_text to a held-out text file instead")
        return int(start)

    def _draw_samples(self, model) -> list[list[int]]:
        from jaxtune.generate import SamplingParams, generate, stop_token_ids

        cfg = self.cfg
        start = self._start_id()
        params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=1.0, seed=cfg.seed,
                                stop_ids=tuple(stop_token_ids(model.config, self.tokenizer)))
        gen = generate(model, [[start]] * cfg.n_samples, params)
        # A sample keeps the EOS it ended on: predicting the end of a document is part of the base's domain.
        seqs = [[start, *t] + ([stop] if stop is not None else []) for t, stop in zip(gen.tokens, gen.stop_tokens)]
        return [s for s in seqs if len(s) >= 2]

    def _probe_outputs(self, model) -> list[dict]:
        from jaxtune.generate import SamplingParams, generate, stop_token_ids

        prompts = [self.tokenizer.encode(p.prompt) for p in self.probes]
        params = SamplingParams(max_new_tokens=self.cfg.probe_tokens,
                                stop_ids=tuple(stop_token_ids(model.config, self.tokenizer)))
        gen = generate(model, prompts, params)
        return [{"id": p.id, "prompt": p.prompt, "ids": t, "finish": r,
                 "text": self.tokenizer.decode(t, skip_special_tokens=True)}
                for p, t, r in zip(self.probes, gen.tokens, gen.finish_reasons)]

    def _general_text(self) -> str | None:
        from jaxtune.eval.loss import read_text_slice

        if self.general_path is None:
            return None
        return read_text_slice(self.general_path, self.cfg.general_start, self.cfg.general_chars)

    # -- metrics ----------------------------------------------------------------------------------------------
    def _raw(self, model) -> tuple[dict, list[dict]]:
        from jaxtune.eval.loss import batches_of, evaluate_loss, read_text_slice, sequence_rows, text_loss

        cfg = self.cfg
        out = {}
        if cfg.base_text:
            out["base_ppl"] = text_loss(model, self.tokenizer, read_text_slice(cfg.base_text), seq_len=cfg.seq_len,
                                        batch_size=cfg.batch_size, max_windows=cfg.max_windows,
                                        mesh=self.mesh).perplexity
        else:
            width = max(cfg.seq_len, cfg.sample_tokens + 1)
            out["base_ppl"] = evaluate_loss(model, batches_of(sequence_rows(self.samples, width), cfg.batch_size),
                                            mesh=self.mesh).perplexity
        general = self._general_text()
        if general is not None:
            out["general_ppl"] = text_loss(model, self.tokenizer, general, seq_len=cfg.seq_len,
                                           batch_size=cfg.batch_size, max_windows=cfg.max_windows,
                                           mesh=self.mesh).perplexity
        outputs = self._probe_outputs(model)
        by_id = {o["id"]: o for o in self.base_outputs or outputs}
        agreements = [token_agreement(_with_stop(by_id[o["id"]]["ids"], by_id[o["id"]]["finish"]),
                                      _with_stop(o["ids"], o["finish"])) for o in outputs]
        out["probe_agreement"] = sum(agreements) / len(agreements)
        return out, outputs

    def recorded(self) -> bool:
        """Whether the run dir holds a baseline (`baseline` then reloads it instead of measuring `model`)."""
        return self.dir is not None and (self.dir / "baseline.json").is_file()

    def baseline(self, model) -> dict:
        """Fix the evaluation sets and measure the base; reload them instead when the run dir has them (then
        `model` is not used and may be None)."""
        if self.recorded():
            return self._load()
        if not self.cfg.base_text:
            self.samples = self._draw_samples(model)
        self.base_outputs = None
        raw, outputs = self._raw(model)
        self.base_outputs = outputs
        self.base_metrics = raw
        if self.dir is not None:
            self._save()
        return self._named(raw)

    def measure(self, model, step: int | None = None) -> dict:
        """`{"forgetting/<name>": value, "forgetting/<name>_rel": relative change vs base}` for this model."""
        if self.base_metrics is None:
            raise RuntimeError("ForgettingMonitor.measure called before baseline(base_model)")
        raw, outputs = self._raw(model)
        self.last_outputs = outputs
        result = self._named(raw)
        self.history.append({"step": step, **result})
        return result

    def _named(self, raw: dict) -> dict:
        out = {}
        for name, value in raw.items():
            out[PREFIX + name] = float(value)
            out[PREFIX + name + "_rel"] = float(_rel(value, self.base_metrics[name]))
        return out

    # -- persistence ------------------------------------------------------------------------------------------
    def _sources(self) -> dict:
        general = self._general_text()
        return {
            "probes": str(self.cfg.probes or DEFAULT_BASE_PROBES),
            "general_text": str(self.general_path) if self.general_path else None,
            "general_sha256": hashlib.sha256(general.encode()).hexdigest() if general is not None else None,
        }

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.samples is not None:
            write_jsonl(self.dir / "base_samples.jsonl",
                        ({"ids": s, "text": self.tokenizer.decode(s, skip_special_tokens=True)} for s in self.samples))
        write_jsonl(self.dir / "base_probe_outputs.jsonl", self.base_outputs)
        doc = {"config": _measured(dataclasses.asdict(self.cfg)), "sources": self._sources(), "base": self.base_metrics}
        (self.dir / "baseline.json").write_text(json.dumps(doc, indent=2) + "\n")

    def _load(self) -> dict:
        doc = json.loads((self.dir / "baseline.json").read_text())
        if _measured(doc["config"]) != _measured(dataclasses.asdict(self.cfg)):
            raise ValueError(f"{self.dir / 'baseline.json'} was recorded with a different forgetting config "
                             f"({doc['config']}); use the same settings or a fresh run dir")
        if doc["sources"]["general_sha256"] != self._sources()["general_sha256"]:
            raise ValueError(f"{self.dir / 'baseline.json'}: the general-text slice changed since the baseline "
                             f"({doc['sources']['general_text']}); restore it or use a fresh run dir")
        samples = self.dir / "base_samples.jsonl"
        if samples.is_file():
            self.samples = [rec["ids"] for _, rec in read_jsonl(samples)]
        outputs = [rec for _, rec in read_jsonl(self.dir / "base_probe_outputs.jsonl")]
        missing = {p.id for p in self.probes} - {o["id"] for o in outputs}
        if missing:
            raise ValueError(f"{self.dir / 'base_probe_outputs.jsonl'} lacks recorded outputs for probes "
                             f"{sorted(missing)}; the probe file changed since the baseline, use a fresh run dir")
        self.base_outputs = outputs
        self.base_metrics = doc["base"]
        self.resumed = True
        return self._named(self.base_metrics)
