"""Data at scale: tokenizing in several processes, the tokenized-rows cache, streaming over DP ranks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_megatron.data.sft_datamodule import PreferenceDataModule, SFTDataModule
from lightning_megatron.data.streaming import StreamingRows
from lightning_megatron.data.text import bundled_corpus
from lightning_megatron.data.tokenizer import train_tokenizer
from tests.conftest import SCRIPTS, run_job


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([bundled_corpus()[:60000]], vocab_size=512)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def rows_of(n, prefix="q"):
    rows = [{"query": f"{prefix}{i} what is it?", "response": f"answer number {i}."} for i in range(n)]
    rows[3] = {"query": "long " * 80, "response": "too long for max_length"}  # dropped, and counted
    return rows


def as_lists(rows):
    return [{k: v.tolist() for k, v in row.items()} for row in rows]


def test_num_proc_gives_the_same_rows_and_counts(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(50))

    def setup(num_proc):
        dm = SFTDataModule(
            [f"{data}#70"], tokenizer, max_length=48, truncation="drop", split_dataset_ratio=0.2, num_proc=num_proc
        )
        dm.setup()
        return dm

    one, two = setup(1), setup(2)
    assert as_lists(two.train) == as_lists(one.train) and as_lists(two.val) == as_lists(one.val)
    assert two.stats == one.stats and one.stats.rows == 70 and one.stats.dropped_too_long >= 1


def test_cache_is_reused_and_keyed_by_data_tokenizer_and_template(tmp_path, tokenizer, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(30))
    cache = tmp_path / "cache"

    def setup(tok=tokenizer, template="chatml", packing=False):
        dm = SFTDataModule(
            [data], tok, max_length=48, truncation="drop", template=template, packing=packing, cache_dir=cache
        )
        with caplog.at_level(logging.INFO):
            caplog.clear()
            dm.setup()
        return dm, "(from the cache)" in caplog.text

    first, hit = setup()
    assert not hit and len(list(cache.glob("*.pt"))) == 1
    second, hit = setup()
    assert hit and as_lists(second.train) == as_lists(first.train) and second.stats == first.stats
    packed, hit = setup(packing=True)  # packing happens after the cache: same key
    assert hit and sum(int((r["segment_ids"] > 0).sum()) for r in packed.train) == sum(
        len(r["input_ids"]) for r in first.train
    )
    llama3, hit = setup(template="llama3")
    assert not hit and as_lists(llama3.train) != as_lists(first.train)
    other = train_tokenizer([bundled_corpus()[:60000]], vocab_size=400)
    _, hit = setup(tok=other)
    assert not hit
    write_jsonl(tmp_path / "d.jsonl", rows_of(31))  # the data changed
    changed, hit = setup()
    assert not hit and changed.stats.rows == 31
    assert len(list(cache.glob("*.pt"))) == 4


def test_preference_pairs_use_the_cache_too(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": "bad"} for i in range(6)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    first = PreferenceDataModule([data], tokenizer, max_length=32, cache_dir=tmp_path / "cache")
    first.setup()
    second = PreferenceDataModule([data], tokenizer, max_length=32, cache_dir=tmp_path / "cache")
    second.setup()
    assert as_lists(second.train) == as_lists(first.train) and "chosen_input_ids" in second.train[0]
    sft = SFTDataModule([data], tokenizer, max_length=32, cache_dir=tmp_path / "cache", lenient=True)
    sft.setup()  # the same file as SFT data is another key (and its rows match no SFT format)
    assert sft.stats.kept == 0 and len(sft.stats.skipped_bad) == 6


def test_streaming_shards_are_even_with_fillers(tmp_path):
    """13 rows, one skipped by the transform, over 2 ranks x 2 workers: every shard yields
    ceil(13 / 4) = 4 items; the real ones are each row but the skipped one, exactly once."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(13)])

    def transform(where, row):
        return None if row["i"] == 5 else torch.tensor([row["i"]])

    seen, per_shard = [], []
    for rank in range(2):
        rows = StreamingRows([path], transform, rank=rank, world_size=2, filler=torch.tensor([-1]))
        for worker_items in _by_worker(rows):
            per_shard.append(len(worker_items))
            seen += [int(t) for t in worker_items]
    assert per_shard == [4, 4, 4, 4]
    assert sorted(i for i in seen if i >= 0) == [i for i in range(13) if i != 5]
    assert seen.count(-1) == 16 - 12


def _by_worker(rows):
    """Items of each of 2 DataLoader workers (batch_size=None keeps them apart in order)."""
    items = list(DataLoader(rows, batch_size=None, num_workers=2))
    # Workers take turns item by item; each yields the same count, so the turns alternate.
    return [items[0::2], items[1::2]]


def test_streaming_sft_under_dp2_sees_each_row_once_and_never_hangs(tmp_path, tokenizer):
    """2 CPU ranks, an odd number of rows and a too-long row dropped on one rank: both ranks run
    the same number of steps (a hang would time out), and every kept row is trained once."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(15))
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "seen.json"
    run_job(
        [str(SCRIPTS / "sft_streaming.py"), "--data", data, "--tokenizer", str(tmp_path / "tok"), "--out", str(out)],
        cwd=tmp_path,
        timeout=240,
    )
    seen = json.loads(out.read_text())
    assert len(seen["0"]) == len(seen["1"]) == 8  # ceil(15 / 2) steps of one sample each
    texts = [t for rank in "01" for t in seen[rank] if t]
    expected = [r["query"] for i, r in enumerate(rows_of(15)) if i != 3]
    assert sorted(texts) == sorted(expected)


def test_lazy_tokenize_gives_the_eager_rows_on_demand(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(20))
    options = dict(max_length=48, truncation="truncate_right", split_dataset_ratio=0.2, batch_size=4)
    eager = SFTDataModule([f"{data}#30"], tokenizer, **options)
    lazy = SFTDataModule([f"{data}#30"], tokenizer, lazy_tokenize=True, num_workers=2, **options)
    eager.setup()
    lazy.setup()
    assert lazy.stats.rows == len(lazy.val) == 6  # only the validation rows are tokenized up front
    assert as_lists(lazy.train[i] for i in range(len(lazy.train))) == as_lists(eager.train)
    batch = next(iter(lazy.train_dataloader()))  # tokenized in 2 worker processes
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    dropping = SFTDataModule([data], tokenizer, max_length=48, truncation="drop", lazy_tokenize=True)
    dropping.setup()
    items = [dropping.train[i] for i in range(len(dropping.train))]
    assert len(items) == 20 and sum(bool((item["labels"] == -100).all()) for item in items) == 1
    assert dropping.stats.dropped_too_long == 1


def test_pretrain_num_proc_gives_the_same_blocks(tmp_path):
    from lightning_megatron.data.pretrain import PretrainDataModule
    from lightning_megatron.data.text import ByteTokenizer

    docs = [f"document number {i} " * (i % 4 + 1) for i in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    one, two = (PretrainDataModule([path], ByteTokenizer(), seq_length=16, num_proc=n) for n in (1, 2))
    one.setup()
    two.setup()
    assert as_lists(two.train) == as_lists(one.train) and len(one.train) == sum(len(d) + 1 for d in docs) // 16
