"""Every setting of an adapt run and its default, in a module with no heavy imports: the
command line builds its flags from these fields without waiting for torch."""

from __future__ import annotations

from dataclasses import dataclass

CONFIDENT_HIGH = 0.7  # a teacher pixel at or above this is taken as building
CONFIDENT_LOW = 0.3  # at or below this, as background; in between: ignored


@dataclass
class AdaptSettings:
    """Every setting of an adapt run and its default, declared once (CLI flags follow them)."""

    steps: int = 300  # optimizer steps: the stopping rule when there are no labelled target tiles
    time_limit: float | None = None  # minutes; the run stops at a step boundary and saves
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-4
    ema: float = 0.99  # teacher = this x teacher + (1 - this) x student after every step
    teacher_tta: str = "none"  # the teacher's pseudo-labels averaged over these views (TTA_MODES; measured)
    low: float = CONFIDENT_LOW  # teacher probability at or below: background
    high: float = CONFIDENT_HIGH  # at or above: building; in between: ignored
    self_training: bool = True  # off: only the batch-norm re-estimation (when on) is applied
    bn: bool = False  # re-estimate batch-norm statistics on the target first (measured: benchmarks/README.md)
    bn_batches: int = 20
    labelled: str | None = None  # the original labelled data (CSV/folder): one labelled batch per step
    val: str | None = None  # labelled target tiles (CSV/folder), to pick the best step
    val_every: int = 50
    save_every: float = 5.0  # minutes between last.pt checkpoints
    seed: int = 0
    device: str = "auto"
    progress: bool = True
