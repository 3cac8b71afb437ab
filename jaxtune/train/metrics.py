"""What a run reports: a tqdm bar (loss, tokens/s), one structured stdout line per `log_every` steps,
TensorBoard scalars (tensorboardX, no TensorFlow) and `metrics.jsonl` in the run dir.

Only process 0 writes, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax

from jaxtune.files import write_text_atomic

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor datasheets). CPUs have no entry: no MFU.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12,
    "TPU v6 lite": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def train_flops_per_token(model_cfg, seq_len: int, n_params: int, n_trainable: int) -> float:
    """Matmul FLOPs per trained token: forward 2N, backward 2N for activation grads plus 2 per *trainable*
    weight (LoRA skips frozen weight grads), plus causal attention scores (6·L·T·H·Dh, half of the
    non-causal 12·L·T·H·Dh)."""
    attn = 6 * model_cfg.num_hidden_layers * seq_len * model_cfg.num_attention_heads * model_cfg.head_dim
    return 4 * n_params + 2 * n_trainable + attn


def is_writer() -> bool:
    return jax.process_index() == 0


class MetricsWriter:
    """`metrics.jsonl` + TensorBoard scalars for one run dir. `kept_through`: the step the run resumes from;
    rows after it (written before a crash, and about to be written again) are dropped from metrics.jsonl and
    purged from TensorBoard, so each step appears once. None (a run starting at step 0) keeps none."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, kept_through: int | None = None):
        self.enabled = is_writer()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_rows(self.path, kept_through)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = 0 if kept_through is None else kept_through + 1
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items() if v is not None}
        record = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        self._file.write(json.dumps({"step": step, "split": split, "time": time.time(), **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A preformatted text panel in TensorBoard (e.g. the data report); metrics.jsonl keeps numbers only."""
        if self._tb is not None:
            self._tb.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_rows(path: Path, kept_through: int | None) -> None:
    """Keep the rows of `path` with step <= `kept_through` (none if None), and drop a line a kill cut short;
    atomically: a temp file renamed over the old one."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kept_through is not None and row.get("step", 0) <= kept_through:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def format_line(step: int, total: int, metrics: dict, split: str = "train") -> str:
    """One greppable line: `train step 10/300 loss=2.3101 accuracy=0.4120 …`."""
    parts = [f"{split} step {step}/{total}"]
    for k, v in metrics.items():
        v = _scalar(v)
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class Progress:
    """tqdm bar over optimizer steps with loss and tokens/s; log lines go through `tqdm.write` so they do
    not tear the bar."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=not (enabled and is_writer()), file=sys.stderr)

    def update(self, metrics: dict) -> None:
        self.bar.set_postfix(loss=f"{_scalar(metrics['loss']):.4f}",
                             tok_s=f"{_scalar(metrics.get('tokens_per_s', 0.0)):.0f}", refresh=False)
        self.bar.update(1)

    def log(self, line: str) -> None:
        if is_writer():
            self._tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
