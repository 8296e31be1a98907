"""Resume's gate: every file of a checkpoint passes the pickle allow-list before DeepSpeed's torch.load opens it."""

from __future__ import annotations

from pathlib import Path

from clova_train.core.errors import ClovaError
from clova_train.core.safe_pickle import check_torch_file
from clova_train.training.parallel.distributed import CollectiveError


def check_checkpoint_files(tag_dir: Path, *, rank: int, world: int) -> None:
    """Check every ``*.pt`` of ``tag_dir`` (each rank a share of them), then agree: every rank raises the first refusal.

    DeepSpeed loads with ``torch.load(weights_only=False)``, and a rank may load files other ranks wrote,
    so no rank starts loading until every file has passed.
    """
    import torch.distributed as td

    files = sorted(tag_dir.glob("*.pt"))
    problem = None
    for path in files[rank::world]:
        try:
            check_torch_file(path)
        except ClovaError as e:
            problem = str(e)
            break
    found = [None] * world
    td.all_gather_object(found, problem)
    first = next((p for p in found if p), None)
    if first:
        raise CollectiveError(first)
