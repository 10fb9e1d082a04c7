"""SFT data: formats, templates and loss masks, sampling and splits, packing, bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_megatron import GPTConfig, GPTModule, MegatronStrategy
from lightning_megatron.data.sft import (
    BUILTIN_TEMPLATES,
    DataFormatError,
    Stats,
    pack,
    render,
    sample_sources,
    to_messages,
    truncate,
)
from lightning_megatron.data.sft_datamodule import SFTDataModule
from lightning_megatron.data.text import bundled_corpus
from lightning_megatron.data.tokenizer import train_tokenizer

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def tiny_config(tokenizer) -> GPTConfig:
    return GPTConfig.preset(
        "qwen2",
        vocab_size=len(tokenizer),
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([bundled_corpus()[:60000]], vocab_size=512)


@pytest.mark.parametrize(
    "row",
    [
        {"messages": EXPECTED},
        {"system": "Be brief.", "messages": EXPECTED[1:]},
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"system": "Be brief.", "instruction": "2+2?", "output": "4"},
        {"system": "Be brief.", "query": "2+2?", "response": "4"},
    ],
    ids=["messages", "messages+system", "sharegpt", "alpaca", "query-response"],
)
def test_formats_normalize_to_messages(row):
    assert to_messages(row) == EXPECTED


def test_alpaca_input_and_query_history():
    assert to_messages({"instruction": "Add", "input": "2 and 2", "output": "4"})[0]["content"] == "Add\n2 and 2"
    history = to_messages({"query": "q2", "response": "r2", "history": [["q1", "r1"]]})
    assert [m["content"] for m in history] == ["q1", "r1", "q2", "r2"]


@pytest.mark.parametrize("template", sorted(BUILTIN_TEMPLATES))
def test_assistant_mask_matches_transformers(tokenizer, template):
    tokenizer.chat_template = BUILTIN_TEMPLATES[template]
    messages = to_messages(
        {"query": "second?", "response": "yes, second.", "history": [["first?", "first."]], "system": "sys"}
    )
    ids, labels = render(messages, tokenizer)
    reference = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(reference["input_ids"])
    assert [label != -100 for label in labels] == [bool(m) for m in reference["assistant_masks"]]
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]


def test_templates_without_generation_markers_mask_by_difference(tokenizer):
    tokenizer.chat_template = (
        BUILTIN_TEMPLATES["chatml"].replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    messages = to_messages({"query": "q", "response": "the answer", "history": [["q0", "r0"]]})
    ids, labels = render(messages, tokenizer)
    learned = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])
    assert learned == "r0<|im_end|>\nthe answer<|im_end|>\n"  # the template's newline follows each turn
    _, last = render(messages, tokenizer, loss_on="last")
    assert (
        tokenizer.decode([i for i, label in zip(ids, last, strict=True) if label != -100]) == "the answer<|im_end|>\n"
    )
    _, everything = render(messages, tokenizer, loss_on="all")
    assert everything == ids
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]


def test_truncation_policies():
    ids, labels, stats = list(range(10)), list(range(10)), Stats()
    assert truncate(ids, labels, 4, "truncate_left", "f:1", stats) == ([6, 7, 8, 9], [6, 7, 8, 9])
    assert truncate(ids, labels, 4, "truncate_right", "f:2", stats) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert truncate(ids, labels, 4, "drop", "f:3", stats) is None
    assert (stats.truncated, stats.dropped_too_long) == (2, 1)
    with pytest.raises(DataFormatError, match="f:4: 10 tokens exceed max_length=4"):
        truncate(ids, labels, 4, "error", "f:4", stats)


def test_sampling_with_and_without_replacement_is_deterministic():
    a, b = list(range(10)), list(range(100, 103))
    mixed = sample_sources([("a", a, 4), ("b", b, 7)], seed=1)
    assert len(mixed) == 11 and mixed == sample_sources([("a", a, 4), ("b", b, 7)], seed=1)
    assert len({x for x in mixed if x < 100}) == 4  # without replacement
    counts = sorted([x for x in mixed if x >= 100].count(v) for v in b)
    assert counts == [2, 2, 3]  # 7 from 3 rows: every row twice, one more drawn without replacement
    assert mixed != sample_sources([("a", a, 4), ("b", b, 7)], seed=2)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows_of(n, prefix="q"):
    return [{"query": f"{prefix}{i} what is it?", "response": f"answer number {i}."} for i in range(n)]


def test_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(20))

    def split(seed):
        dm = SFTDataModule([str(data)], tokenizer, max_length=64, split_dataset_ratio=0.25, seed=seed, batch_size=2)
        dm.setup()
        return [r["input_ids"].tolist() for r in dm.train], [r["input_ids"].tolist() for r in dm.val]

    train, val = split(0)
    assert len(val) == 5 and len(train) == 15 and not any(v in train for v in val)
    assert split(0) == (train, val) and split(1) != (train, val)


def test_packing_gives_each_sample_its_own_logits(tokenizer):
    """A packed row's logits at each sample's positions equal that sample run alone."""
    samples = [render(to_messages(r), tokenizer) for r in rows_of(3)]
    (row,) = pack(samples, seq_length=sum(len(ids) for ids, _ in samples) + 5)
    config = tiny_config(tokenizer)
    model = GPTModule(config)
    trainer = L.Trainer(
        strategy=MegatronStrategy(),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    packed = trainer.predict(model, DataLoader([row], batch_size=1))[0][0]
    start = 0
    for ids, _ in samples:
        alone = trainer.predict(model, DataLoader([{"input_ids": torch.tensor(ids)}], batch_size=1))[0][0]
        assert (packed[start : start + len(ids)] - alone).abs().max() < 1e-5
        start += len(ids)
    # Loss: boundaries and padding are masked, so the token count equals the samples' own.
    from lightning_megatron.models.gpt import prepare_inputs

    packed_tokens = prepare_inputs({k: v[None] for k, v in row.items()})["loss_mask"].sum()
    alone_tokens = sum(
        prepare_inputs({"input_ids": torch.tensor([i]), "labels": torch.tensor([lab])})["loss_mask"].sum()
        for i, lab in samples
    )
    assert packed_tokens == alone_tokens


def test_sft_datamodule_trains_with_packing(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(40))
    dm = SFTDataModule([f"{data}#60"], tokenizer, max_length=96, packing=True, batch_size=2, split_dataset_ratio=0.1)
    config = tiny_config(tokenizer)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        strategy=MegatronStrategy(micro_batch_size=1),
        accelerator="cpu",
        devices=1,
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Record()],
        limit_val_batches=1,
        val_check_interval=4,
    )
    trainer.fit(GPTModule(config, lr=3e-3), datamodule=dm)
    assert dm.stats.rows == 60 and dm.stats.kept == 60 and "segment_ids" in dm.train[0]
    assert losses[-1] < losses[0] and "val/loss" in trainer.callback_metrics


def test_bad_input_names_file_and_line(tmp_path, tokenizer):
    good = json.dumps(rows_of(1)[0])
    cases = {
        "bad-json": (good + "\n{not json\n", "bad-json.jsonl:2: invalid JSON"),
        "no-format": (
            good + "\n" + json.dumps({"text": "hello"}) + "\n",
            r"no-format.jsonl:2: row has keys \['text'\]",
        ),
        "empty-answer": (
            json.dumps({"query": "q", "response": " "}) + "\n",
            "empty-answer.jsonl:1: an assistant turn is empty",
        ),
        "too-long": (
            json.dumps({"query": "q " * 200, "response": "r"}) + "\n",
            "too-long.jsonl:1: .* exceed max_length=64",
        ),
    }
    cases["not-an-object"] = (good + "\n[1, 2]\n", "not-an-object.jsonl:2: expected a JSON object, got a list")
    cases["no-role"] = (
        json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}) + "\n",
        "no-role.jsonl:1: each of 'messages' needs a 'role' and a 'content'",
    )
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(DataFormatError, match=message):
            SFTDataModule([str(path)], tokenizer, max_length=64).setup()
    with pytest.raises(DataFormatError, match="missing.jsonl: cannot read"):
        SFTDataModule([str(tmp_path / "missing.jsonl")], tokenizer).setup()
    (tmp_path / "dict.json").write_text(json.dumps({"messages": []}))
    with pytest.raises(DataFormatError, match="dict.json: a .json file must hold a list of rows"):
        SFTDataModule([str(tmp_path / "dict.json")], tokenizer).setup()
    # Lenient: the bad row is skipped and listed, never dropped silently.
    lenient = SFTDataModule([str(tmp_path / "no-format.jsonl")], tokenizer, max_length=64, lenient=True)
    lenient.setup()
    assert lenient.stats.kept == 1 and len(lenient.stats.skipped_bad) == 1


def test_self_cognition_source_fills_name_and_author(tokenizer):
    dm = SFTDataModule(["self-cognition#30"], tokenizer, max_length=128, model_name="Lumen", model_author="Ada")
    dm.setup()
    texts = [tokenizer.decode(r["input_ids"]) for r in dm.train]
    assert dm.stats.kept == 30 and all("Lumen" in t or "Ada" in t for t in texts)
    assert not any("{{" in t for t in texts)
    with pytest.raises(ValueError, match="needs model_name"):
        SFTDataModule(["self-cognition#3"], tokenizer).setup()


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected_response": "5",
        },
        {
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
        {"query": "2+2?", "response": "4", "rejected_response": "5"},
    ],
    ids=["prompt-chosen-rejected", "swift-messages", "conversation-pairs", "query-response"],
)
def test_preference_formats(row, tokenizer):
    from lightning_megatron.data.sft import render_preference, to_preference

    assert to_preference(row) == ([{"role": "user", "content": "2+2?"}], "4", "5")
    pair = render_preference(row, tokenizer)
    learned = {
        k: tokenizer.decode(
            [i for i, lab in zip(pair[f"{k}_input_ids"], pair[f"{k}_labels"], strict=True) if lab != -100]
        )
        for k in ("chosen", "rejected")
    }
    assert learned == {"chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}


def test_bad_preference_rows():
    from lightning_megatron.data.sft import to_preference

    with pytest.raises(DataFormatError, match="f:3: the rejected answer is empty"):
        to_preference({"prompt": "q", "chosen": "a", "rejected": ""}, "f:3")
    with pytest.raises(DataFormatError, match="differ before the last turn"):
        to_preference(
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            }
        )
    with pytest.raises(DataFormatError, match="matching no preference format"):
        to_preference({"text": "x"})


def test_preference_datamodule_batches(tmp_path, tokenizer):
    from lightning_megatron.data.sft_datamodule import PreferenceDataModule

    rows = [{"prompt": f"q{i}?", "chosen": f"good answer {i}", "rejected": "bad"} for i in range(6)]
    rows.append({"prompt": "q?", "chosen": "x " * 100, "rejected": "y"})  # too long: dropped and counted
    dm = PreferenceDataModule(
        [str(write_jsonl(tmp_path / "p.jsonl", rows))], tokenizer, max_length=32, truncation="drop", batch_size=3
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert dm.stats.kept == 6 and dm.stats.dropped_too_long == 1
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == batch["rejected_labels"].shape
    assert batch["chosen_input_ids"].shape[0] == 3 and batch["chosen_input_ids"].shape[1] % 8 == 0


def test_pretrain_datamodule_reads_txt_jsonl_parquet_and_datasets(tmp_path):
    import datasets

    from lightning_megatron.data.pretrain import PretrainDataModule
    from lightning_megatron.data.text import ByteTokenizer

    docs = [f"document number {i} " * 5 for i in range(20)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:10]))
    write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in docs[10:]])
    datasets.Dataset.from_dict({"text": docs[10:]}).to_parquet(tmp_path / "c.parquet")
    files = PretrainDataModule(
        [tmp_path / "a.txt", tmp_path / "b.jsonl"], ByteTokenizer(), seq_length=32, split_dataset_ratio=0.2
    )
    files.setup()
    expected = sum(len(d.encode()) + 1 for d in docs) // 32
    assert len(files.train) + len(files.val) == expected and len(files.val) == round(expected * 0.2)
    parquet = PretrainDataModule([tmp_path / "c.parquet"], ByteTokenizer(), seq_length=32)
    in_memory = PretrainDataModule(datasets.Dataset.from_dict({"text": docs[10:]}), ByteTokenizer(), seq_length=32)
    parquet.setup()
    in_memory.setup()
    assert [r["input_ids"].tolist() for r in parquet.train] == [r["input_ids"].tolist() for r in in_memory.train]
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataFormatError, match="bad.jsonl:2: no 'text' field"):
        PretrainDataModule([tmp_path / "bad.jsonl"], ByteTokenizer(), seq_length=4).setup()
    write_jsonl(tmp_path / "null.jsonl", [{"text": "ok"}, {"text": None}])
    with pytest.raises(DataFormatError, match="null.jsonl:2: 'text' is a NoneType, not text"):
        PretrainDataModule([tmp_path / "null.jsonl"], ByteTokenizer(), seq_length=4).setup()
    with pytest.raises(DataFormatError, match=r"c.parquet: no 'body' column \(columns \['text'\]\)"):
        PretrainDataModule([tmp_path / "c.parquet"], ByteTokenizer(), seq_length=4, text_field="body").setup()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataFormatError, match="latin1.txt: cannot read"):
        PretrainDataModule([tmp_path / "latin1.txt"], ByteTokenizer(), seq_length=4).setup()


def test_streaming_shards_rows_over_ranks_and_workers(tmp_path, tokenizer):
    """DP2 x 2 loader workers: every row is read exactly once per epoch."""
    from lightning_megatron.data.streaming import StreamingRows

    paths = [write_jsonl(tmp_path / "a.jsonl", rows_of(7, "a")), write_jsonl(tmp_path / "b.jsonl", rows_of(6, "b"))]
    seen = []
    for rank in range(2):
        rows = StreamingRows(paths, lambda where, row: row["query"], rank=rank, world_size=2)
        seen += list(DataLoader(rows, batch_size=None, num_workers=2))
    assert sorted(seen) == sorted(r["query"] for r in rows_of(7, "a") + rows_of(6, "b"))


def test_streaming_sft_resumes_at_the_next_unseen_batch(tmp_path, tokenizer):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = write_jsonl(tmp_path / "d.jsonl", rows_of(40))
    config = GPTConfig.preset(
        "qwen2", vocab_size=len(tokenizer), num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64
    )

    def fit(steps, ckpt_path=None, callbacks=()):
        batches = []

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                batches.append(batch["input_ids"][:, :6].tolist())

        dm = SFTDataModule([str(data)], tokenizer, max_length=64, batch_size=2, streaming=True)
        trainer = L.Trainer(
            strategy=MegatronStrategy(micro_batch_size=2),
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Record(), *callbacks],
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(GPTModule(config), datamodule=dm, ckpt_path=ckpt_path)
        return batches

    uninterrupted = fit(6)
    fit(3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)])
    assert fit(6, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt") == uninterrupted[3:]


def test_packed_seq_params_from_segments():
    from lightning_megatron.models.gpt import packed_seq_params

    params = packed_seq_params(torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]]))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 5, 7, 14]
    assert params.max_seqlen_q == params.max_seqlen_kv == 7
    # The same id at the end of one row and the start of the next is two sequences.
    assert packed_seq_params(torch.tensor([[1, 1], [1, 1]])).cu_seqlens_q.tolist() == [0, 2, 4]


def test_thd_packing_gives_each_sample_its_own_logits_and_the_mask_paths_loss(tokenizer):
    """Packed rows in Megatron's THD format (PackedSeqParams, RoPE restarted per sample through
    cu_seqlens): two rows per microbatch, each sample's logits equal it run alone, and the loss
    equals the block-diagonal-mask path's."""
    samples = [render(to_messages(r), tokenizer) for r in rows_of(5)]
    rows = pack(samples, seq_length=sum(len(ids) for ids, _ in samples[:3]) + 4)
    assert len(rows) == 2
    config = tiny_config(tokenizer)

    def trainer():
        return L.Trainer(
            strategy=MegatronStrategy(micro_batch_size=2),
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    thd = GPTModule(config, packed_format="thd")
    packed = trainer().predict(thd, DataLoader(rows, batch_size=2))[0]
    placed = [
        (r, rows[r]["segment_ids"] == k) for r in range(2) for k in range(1, int(rows[r]["segment_ids"].max()) + 1)
    ]
    assert len(placed) == len(samples)
    for (ids, _), (r, where) in zip(samples, placed, strict=True):
        twice = [{"input_ids": torch.tensor(ids)}] * 2  # one microbatch of 2 rows, as the packed ones
        alone = trainer().predict(thd, DataLoader(twice, batch_size=2))[0][0]
        assert (packed[r][where] - alone).abs().max() < 1e-5
    losses = {
        fmt: trainer().validate(GPTModule(config, packed_format=fmt), DataLoader(rows, batch_size=2), verbose=False)[0][
            "val/loss"
        ]
        for fmt in ("thd", "mask")
    }
    assert losses["thd"] == pytest.approx(losses["mask"], abs=1e-5)


def test_padding_free_batches_give_the_padded_batchs_loss(tmp_path, tokenizer):
    """A padding-free batch (the samples end to end in one row) gives the token-weighted loss of
    the same samples padded to a [b, s] batch, with the mask and with THD."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_of(6))

    def batch(**options):
        dm = SFTDataModule([str(data)], tokenizer, max_length=64, batch_size=6, **options)
        dm.setup()
        return dm.collate(sorted(dm.train, key=lambda r: r["input_ids"].tolist()))

    padded, free = batch(), batch(padding_free=True)
    tokens = sum(int(m.sum()) for m in padded["attention_mask"])
    assert free["input_ids"].shape == (1, -(-tokens // 8) * 8) and int((free["segment_ids"] > 0).sum()) == tokens

    def loss(rows, micro_batch_size, packed_format="auto"):
        trainer = L.Trainer(
            strategy=MegatronStrategy(micro_batch_size=micro_batch_size),
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = GPTModule(tiny_config(tokenizer), packed_format=packed_format)
        return trainer.validate(module, DataLoader([rows], batch_size=None), verbose=False)[0]["val/loss"]

    reference = loss(padded, 6)
    assert loss(free, 1) == pytest.approx(reference, abs=1e-5)
    assert loss(free, 1, "thd") == pytest.approx(reference, abs=1e-5)
