"""Images in the logs: every ``log.image_every`` epochs, a grid of that epoch's rollout samples
(a few prompts x a few samples, each labelled with its prompt and reward) goes to
``RUN/images/epoch_EEEE.png``, to TensorBoard (``add_image``, tag ``rollout/samples``) and to
Weights & Biases when ``log.wandb`` is on (:func:`start_wandb`).

2-D toy states are drawn as one scatter of the process's rollout, coloured by reward.
Nothing here draws random numbers or touches gradients: logging images never changes a run.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from advantageflow.runlog import atomic_path, filmstrip

IMAGE_TAG = "rollout/samples"
WANDB_ID_FILE = "wandb_run.json"  # the W&B run id, so that --resume continues the same W&B run


def image_due(image_every: int, epoch: int) -> bool:
    """Whether epoch ``epoch`` (1-based, completed) logs images; ``image_every = 0`` never does."""
    return image_every > 0 and epoch % image_every == 0


def pick_rows(group_ids: Tensor, n_prompts: int, n_samples: int) -> list[list[int]]:
    """Rows shown: the first ``n_samples`` samples of each of the first ``n_prompts`` groups
    (in rollout order), as one list of row indices per group."""
    groups: dict[int, list[int]] = {}
    for row, gid in enumerate(group_ids.tolist()):
        if gid not in groups:
            if len(groups) == n_prompts:
                continue
            groups[gid] = []
        if len(groups[gid]) < n_samples:
            groups[gid].append(row)
    return list(groups.values())


def render_grid(images: Tensor, rows: list[list[int]], prompts: list[str], rewards: Tensor) -> np.ndarray:
    """One row per group: its prompt as a title over its samples, each captioned with its reward.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``, indexed by the row indices in ``rows``.
        rows: row indices per group (:func:`pick_rows`).
        prompts: ``B`` prompt strings; rewards: ``(B,)``.

    Returns:
        ``(H', W', 3)`` uint8 image.
    """
    from PIL import Image, ImageDraw

    images = images.detach().float().cpu().clamp(0, 1)
    _, _, h, w = images.shape
    scale = max(1, 128 // max(h, w))
    cell_h, cell_w, pad = h * scale, w * scale, 4
    ncol = max(len(r) for r in rows)
    width = max(ncol * (cell_w + pad) + pad, 256)
    chars = max(20, (width - 2 * pad) // 6)  # PIL's default bitmap font is about 6 px per character
    titles = [textwrap.wrap(prompts[r[0]] or "(no prompt)", chars)[:2] for r in rows]
    line, caption = 11, 12
    height = pad + sum(len(t) * line + cell_h + caption + pad for t in titles)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for group, title in zip(rows, titles):
        for i, text in enumerate(title):
            draw.text((pad, y + i * line), text, fill=(0, 0, 0))
        y += len(title) * line
        for col, row in enumerate(group):
            arr = (images[row].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            x = pad + col * (cell_w + pad)
            canvas.paste(Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST), (x, y))
            draw.text((x, y + cell_h + 1), f"r={float(rewards[row]):.3f}", fill=(0, 0, 128))
        y += cell_h + caption + pad
    return np.asarray(canvas)


def render_points(points: Tensor, rewards: Tensor, title: str) -> np.ndarray:
    """Scatter of ``(B, 2)`` states coloured by their ``(B,)`` rewards, as ``(H, W, 3)`` uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, rewards = points.detach().float().cpu(), rewards.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=80)
    sc = ax.scatter(points[:, 0], points[:, 1], c=rewards.nan_to_num(0.0), s=6, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="reward")
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


@torch.no_grad()
def epoch_image(
    policy: Any,
    x0: Tensor,
    prompts: list[str],
    group_ids: Tensor,
    rewards: Tensor,
    n_prompts: int,
    n_samples: int,
    epoch: int,
) -> np.ndarray:
    """The picture of one epoch's rollout (``x0`` ``(B, *S)``, ``rewards`` ``(B,)``): a labelled
    grid of decoded images, or a reward-coloured scatter for 2-D states."""
    rows = pick_rows(group_ids.cpu(), n_prompts, n_samples)
    flat = [r for group in rows for r in group]
    with torch.random.fork_rng(devices=[]):  # a decoder that draws must not shift the run's draws
        decoded = policy.decode(x0[flat])
    if decoded.dim() == 2 and decoded.shape[1] == 2:
        return render_points(policy.decode(x0), rewards, f"epoch {epoch} rollout")
    if decoded.dim() == 5:  # videos: a film strip per sample
        decoded = filmstrip(decoded)
    if decoded.dim() != 4:
        raise ValueError(f"cannot draw decoded samples of shape {tuple(decoded.shape)}")
    index = {row: i for i, row in enumerate(flat)}
    local = [[index[r] for r in group] for group in rows]
    return render_grid(decoded, local, [prompts[r] for r in flat], rewards[flat])


def log_epoch_images(
    log_cfg: Any,
    epoch: int,
    step: int,
    policy: Any,
    x0: Tensor,
    prompts: list[str],
    group_ids: Tensor,
    rewards: Tensor,
    logger: Any,
) -> Path | None:
    """When epoch ``epoch`` is due (``log.image_every``), write ``RUN/images/epoch_EEEE.png``
    and hand the picture to the logger's TensorBoard / W&B; returns the PNG's path."""
    if not logger.enabled or not image_due(log_cfg.image_every, epoch):
        return None
    from PIL import Image

    image = epoch_image(policy, x0, prompts, group_ids, rewards, log_cfg.image_prompts, log_cfg.image_samples, epoch)
    out = logger.run_dir / "images" / f"epoch_{epoch:04d}.png"
    out.parent.mkdir(exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    logger.log_image(step, IMAGE_TAG, image, caption=f"epoch {epoch}: prompts and rewards of rollout samples")
    return out


def start_wandb(run_dir: Path, project: str, config: dict) -> Any:
    """Start (or, for a resumed run, continue) the W&B run of ``run_dir``; its files go under
    ``RUN/wandb``.  ``WANDB_MODE=offline`` needs no account (``wandb sync`` uploads later)."""
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "log.wandb is true but the 'wandb' package is not installed: pip install 'advantageflow[wandb]' "
            "(or set log.wandb=false)"
        ) from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else uuid.uuid4().hex[:12]
    run = wandb.init(
        project=project,
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
        settings=wandb.Settings(console="off", silent=True),
    )
    if not id_file.exists():
        id_file.write_text(json.dumps({"id": run_id, "project": project}) + "\n")
    return run


def wandb_image(image: np.ndarray, caption: str) -> Any:
    """A ``wandb.Image`` of an ``(H, W, 3)`` uint8 array."""
    import wandb

    return wandb.Image(image, caption=caption)
