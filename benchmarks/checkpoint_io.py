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

SHAPE = dict(vocab_size=32000, num_layers=28, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
             ffn_hidden_size=5632, tie_word_embeddings=False)


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
    """Save at the given step and time it (the blocking part; async: also until it lands)."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step, self.result = path, step, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.save_checkpoint(self.path)
        blocking = time.perf_counter() - start
        trainer.strategy.checkpoint_io.finalize(blocking=True)
        self.result = {"blocking_s": blocking, "total_s": time.perf_counter() - start}


def run(out: Path, steps: int, async_save: bool, ckpt_path: Path | None = None, save_to: Path | None = None,
        optim_format: str = "dp_reshardable"):
    torch.manual_seed(0)
    rows = torch.randint(0, 32000, (4 * (steps + 1), 2048))
    data = DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=4)
    saver = SaveAt(save_to, steps) if save_to else None
    trainer = L.Trainer(
        strategy=TimedStrategy(micro_batch_size=2, checkpoint_io=MegatronCheckpointIO(async_save=async_save, optim_format=optim_format)),
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps + (1 if ckpt_path else 0),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[saver] if saver else [],
    )
    model = GPTModule(GPTConfig.preset("llama", **SHAPE), lr=1e-4)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    params = sum(p.numel() for p in model.parameters())
    return params, (saver.result if saver else {"load_s": TimedStrategy.load_seconds})


PHASES = ("sync", "async", "load", "fully_reshardable")


def phase(name: str, out: Path) -> dict:
    """One measurement; each runs in its own process so no GPU memory carries over."""
    if name in ("sync", "async", "fully_reshardable"):
        path = out / f"{name}.ckpt"
        params, saved = run(out, 2, async_save=name == "async", save_to=path,
                            optim_format="fully_reshardable" if name == "fully_reshardable" else "dp_reshardable")
        gib = size_gib(path)
        if name != "sync":
            shutil.rmtree(path)  # the disk holds about two checkpoints of this size
        return {"what": f"{name} save", "params_B": params / 1e9, "GiB": gib, **saved, "GiBps": gib / saved["total_s"]}
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
        proc = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--phase", name],
                              capture_output=True, text=True)
        lines = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        rows.append(json.loads(lines[-1]) if lines else {"what": name, "error": proc.stderr[-300:]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| what | size GiB | blocking s | total s | GiB/s |\n|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['what']} | {row['error'][:60]} | | | |")
            continue
        total = row.get("total_s", row.get("load_s"))
        print(f"| {row['what']} | {row['GiB']:.1f} | {row.get('blocking_s', total):.1f} | {total:.1f} | {row['GiBps']:.2f} |")
    print(f"\nlimits: disk write {limits['disk_write_GiBps']:.2f} GiB/s (fsync), disk read {limits['disk_read_GiBps']:.2f} GiB/s, "
          f"device-to-host {limits['d2h_GiBps']:.1f} GiB/s")
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
