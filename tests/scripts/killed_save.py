"""Train with a checkpoint every 2 steps and die by SIGKILL in the middle of the step-4 save:
after every rank wrote its shards, before the checkpoint is published.

    python tests/scripts/killed_save.py OUT_DIR
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_megatron.checkpoint as checkpoint  # noqa: E402
from tests.test_checkpoint import every, fit  # noqa: E402

publish = checkpoint._publish


def publish_or_die(staging: Path, path: Path, info: dict) -> None:
    if path.name == "epoch=0-step=4.ckpt":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(staging, path, info)


def main() -> None:
    warnings.filterwarnings("ignore")
    checkpoint._publish = publish_or_die
    fit(6, callbacks=[every(sys.argv[1])])


if __name__ == "__main__":
    main()
