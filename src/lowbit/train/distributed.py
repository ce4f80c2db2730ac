"""Process-group helpers. Training is single-process today; these are the seams for DDP.

Under ``torch.distributed`` every rank trains, but only the main process (rank 0) writes
checkpoints and logs. With no process group initialised the single process is the main one.
"""

from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    """This process's rank in the default process group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0
