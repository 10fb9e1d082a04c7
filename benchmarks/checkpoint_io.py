"""Checkpoint speed on one GPU: sync save, async save (blocking part and total), load (resume).

    python benchmarks/checkpoint_io.py --out /tmp/ckpt-bench          # ~1.5B Llama-shape, bf16-mixed

Prints one JSON line per measurement and a Markdown table, next to two limits measured in the
same run: the disk's sequential write/read speed (fsync'd) and device-to-host copy bandwidth.
A checkpoint holds bf16 weights plus the fp32 master weights and both Adam moments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronCheckpointIO, MegatronStrategy

SHAPE = dict(
    vocab_size=32000,
    num_layers=28,
    hidden_size=2048,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=5632,
    tie_word_embeddings=False,
)


def disk_speed(directory: Path, gib: float = 4.0) -> dict[str, float]:
    block = os.urandom(64 << 20)
    path = directory / "disk-probe.bin"
    n = int(gib * 1024 / 64)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = gib / (time.perf_counter() - start)
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    read = gib / (time.perf_counter() - start)
    path.unlink()
    return {"disk_write_GiBps": write, "disk_read_GiBps": read}


def d2h_speed(gib: float = 2.0) -> float:
    x = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda")
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    host.copy_(x)
    torch.cuda.synchronize()
    return gib / (time.perf_counter() - start)


def size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / (1 << 30)


class TimedStrategy(MegatronStrategy):
    load_seconds = 0.0

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loaded = super().load_checkpoint(checkpoint_path, weights_only)
        torch.cuda.synchronize()
        TimedStrategy.load_seconds = time.perf_counter() - start
        return loaded


class SaveAt(L.Callback):
    """Save after steps 2 and 3 and time each (the blocking part; async: also until it lands).

    The first save in a process also starts Megatron's writer helper (a spawn-context process
    that imports the training script's modules); the second shows the steady state.
    """

    def __init__(self, path: Path, keep_first: bool) -> None:
        self.path, self.keep_first, self.result = path, keep_first, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step not in (2, 3):
            return
        path = self.path if step == 2 else self.path.with_name(self.path.name + "-again")
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        blocking = time.perf_counter() - start
        trainer.strategy.checkpoint_io.finalize(blocking=True)
        total = time.perf_counter() - start
        self.result[f"save{step - 1}"] = {"blocking_s": blocking, "total_s": total, "GiB": size_gib(path)}
        if step == 3 or not self.keep_first:
            shutil.rmtree(path)  # the disk holds about three checkpoints of this size


def run(
    out: Path,
    steps: int,
    async_save: bool,
    ckpt_path: Path | None = None,
    save_to: Path | None = None,
    optim_format: str = "dp_reshardable",
):
    torch.manual_seed(0)
    rows = torch.randint(0, 32000, (4 * (steps + 1), 2048))
    data = DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=4)
    saver = SaveAt(save_to, keep_first=not async_save) if save_to else None
    trainer = L.Trainer(
        strategy=TimedStrategy(
            micro_batch_size=2, checkpoint_io=MegatronCheckpointIO(async_save=async_save, optim_format=optim_format)
        ),
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver] if saver else [],
    )
    model = GPTModule(GPTConfig.preset("llama", **SHAPE), lr=1e-4)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    params = sum(p.numel() for p in model.parameters())
    return params, (saver.result if saver else {"load_s": TimedStrategy.load_seconds})


PHASES = ("sync", "async", "load")


def phase(name: str, out: Path) -> dict:
    """One measurement; each runs in its own process so no GPU memory carries over."""
    if name in ("sync", "async"):
        params, saved = run(out, 2, async_save=name == "async", save_to=out / f"{name}.ckpt")
        return {"what": f"{name} save", "params_B": params / 1e9, **saved}
    path = out / "sync.ckpt"
    _, loaded = run(out, 2, async_save=False, ckpt_path=path)
    return {"what": "load (resume)", "GiB": size_gib(path), **loaded, "GiBps": size_gib(path) / loaded["load_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/ckpt-bench"))
    parser.add_argument("--phase", choices=PHASES)
    args = parser.parse_args()
    if args.phase:
        try:
            row = phase(args.phase, args.out)
        except torch.OutOfMemoryError as error:
            row = {"what": f"{args.phase}", "error": "CUDA out of memory: " + str(error)[:120]}
        print("ROW " + json.dumps(row), flush=True)
        return
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    limits = {**disk_speed(args.out), "d2h_GiBps": d2h_speed()}
    print(json.dumps({"limits": limits}), flush=True)
    rows = []
    for name in PHASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--out", str(args.out), "--phase", name], capture_output=True, text=True
        )
        lines = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        rows.append(json.loads(lines[-1]) if lines else {"what": name, "error": proc.stderr[-300:]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| what | size GiB | blocking s | total s | GiB/s |\n|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['what']} | {row['error'][:60]} | | | |")
        elif "load_s" in row:
            print(
                f"| {row['what']} | {row['GiB']:.1f} | {row['load_s']:.1f} | {row['load_s']:.1f} | {row['GiBps']:.2f} |"
            )
        else:
            for key, label in (("save1", "first in process"), ("save2", "steady state")):
                m = row[key]
                print(
                    f"| {row['what']}, {label} | {m['GiB']:.1f} | {m['blocking_s']:.1f} | {m['total_s']:.1f} "
                    f"| {m['GiB'] / m['total_s']:.2f} |"
                )
    print(
        f"\nlimits: disk write {limits['disk_write_GiBps']:.2f} GiB/s (fsync), "
        f"disk read {limits['disk_read_GiBps']:.2f} GiB/s, device-to-host {limits['d2h_GiBps']:.1f} GiB/s"
    )
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
