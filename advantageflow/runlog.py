"""The run folder a person opens: metrics (JSONL + TensorBoard), plots and sample grids.

Metric vocabulary (one for every algorithm): ``reward/mean``, ``reward/std``,
``reward/<component>``, ``loss/total``, ``loss/<term>``, ``stats/<name>`` (``grad_norm``,
``zero_std_ratio``, ``clipfrac`` ...), ``perf/<name>`` (``samples_per_s``, ``rollout_s``,
``train_s``; the cumulative cost counters ``network_rows_fwd``, ``network_rows_bwd``, ``flops``,
``eval_network_rows_fwd``, ``eval_flops`` of :mod:`advantageflow.compute`), ``eval/<name>``.

Every file that is rewritten (``metrics.jsonl`` on resume, config, summaries, plots, sample
grids) is written to a temporary file beside it, flushed, then renamed over the old one
(:func:`atomic_path`): a kill at any moment leaves the old file or the new one, never a
truncated one.  ``metrics.jsonl`` rows are appended; a torn last line is skipped on reading.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from advantageflow.faults import fault_point


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, flush it to disk
    and rename it over ``path`` (on an error the temporary file is removed, ``path`` untouched)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        fault_point("rewrite")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes killed before their rename (``.NAME.tmp-PID``)."""
    for leftover in Path(folder).glob(".*.tmp-*"):
        try:
            leftover.unlink()
        except OSError:
            pass


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) in one rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl``; mirrors scalars (and images,
    :meth:`log_image`) to TensorBoard and, given a ``wandb`` run, to Weights & Biases."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True, wandb: Any = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = wandb if enabled else None
        if enabled and tensorboard:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a core dependency
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def log_image(self, step: int, tag: str, image: Any, caption: str = "") -> None:
        """Log an ``(H, W, 3)`` uint8 array as image ``tag`` at ``step`` (TensorBoard, W&B)."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            from advantageflow.imagelog import wandb_image

            self._wandb.log({tag: wandb_image(image, caption)}, step=step)

    def truncate_after(self, epoch: int) -> None:
        """Drop rows logged after ``epoch`` (a resumed run re-logs them identically)."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_metrics(self.path)
        kept = [r for r in rows if r.get("epoch", 0) <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Flush and close the writers (a second call does nothing)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def as_number(value: Any) -> float | None:
    """A logged metric as a float (``"nan"``/``"inf"`` strings included), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_curves(rows: list[dict], out: Path, keys: tuple[str, ...] = ("reward/mean",)) -> Path | None:
    """Line plot of metrics against step (train rows and ``eval/`` rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            series[key] = pts
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def filmstrip(videos: Tensor, max_frames: int = 4) -> Tensor:
    """Videos ``(B, F, 3, H, W)`` as images ``(B, 3, H, k W)``: ``k = min(F, max_frames)`` evenly
    spaced frames side by side (first and last included), for grids and logs."""
    frames = videos.shape[1]
    k = min(frames, max_frames)
    picks = [round(i * (frames - 1) / max(k - 1, 1)) for i in range(k)]
    chosen = videos[:, picks]  # (B, k, 3, H, W)
    b, _, c, h, w = chosen.shape
    return chosen.permute(0, 2, 3, 1, 4).reshape(b, c, h, k * w)


def save_samples(samples: Tensor, out: Path, title: str = "", ncol: int = 8, labels: list[str] | None = None) -> Path:
    """PNG of decoded samples: a scatter for ``(B, 2)`` points, a grid for ``(B, 3, H, W)`` images
    (videos ``(B, F, 3, H, W)`` as film strips)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = samples.detach().float().cpu()
    if samples.dim() == 5:  # videos: a film strip per sample
        samples = filmstrip(samples)
    if samples.dim() == 2 and samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.5)
        ax.set_aspect("equal")
        lim = float(samples.abs().max().clamp(max=8)) + 0.5
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(title)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return out
    if samples.dim() != 4:
        raise ValueError(f"cannot plot samples of shape {tuple(samples.shape)}")
    save_image_grid(samples, out, ncol=ncol, labels=labels, title=title)
    return out


def save_image_grid(images: Tensor, out: Path, ncol: int = 8, labels: list[str] | None = None, title: str = "") -> None:
    """Grid of ``(B, 3, H, W)`` images in ``[0, 1]``, upscaled, with optional captions."""
    from PIL import Image, ImageDraw

    images = images.clamp(0, 1)
    b, _, h, w = images.shape
    scale = max(1, 96 // max(h, w))
    cell_h, cell_w = h * scale, w * scale
    caption_h = 12 if labels else 0
    title_h = 14 if title else 0
    ncol = min(ncol, b)
    nrow = math.ceil(b / ncol)
    canvas = Image.new("RGB", (ncol * (cell_w + 4) + 4, title_h + nrow * (cell_h + caption_h + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 1), title, fill=(0, 0, 0))
    for i in range(b):
        arr = (images[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
        x = 4 + (i % ncol) * (cell_w + 4)
        y = title_h + 4 + (i // ncol) * (cell_h + caption_h + 4)
        canvas.paste(tile, (x, y))
        if labels:
            draw.text((x, y + cell_h), labels[i][: cell_w // 6], fill=(0, 0, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
