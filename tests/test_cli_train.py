"""`lightning-megatron pt | sft | dpo | infer`: config files, overrides, Megatron-SWIFT aliases,
--print_config round trips, a real training run that saves, a chat with the result, bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_megatron import GPTConfig, RecomputeConfig
from lightning_megatron.cli import main
from lightning_megatron.data.text import bundled_corpus
from lightning_megatron.data.tokenizer import train_tokenizer
from lightning_megatron.swift_args import LISTS, SWITCHES, TRAIN_ALIASES, translate
from lightning_megatron.train_cli import MegatronCLI
from tests.conftest import job_env

TINY = dict(
    family="qwen2",
    vocab_size=512,
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    max_position_embeddings=512,
)
SELF_COGNITION = ["--dataset", "self-cognition#8", "--model_name", "Tiny", "--model_author", "Tests"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory with a tokenizer (`tok`) and a base config for a tiny model (`base.yaml`)."""
    root = tmp_path_factory.mktemp("cli_train")
    train_tokenizer([bundled_corpus()[:60000]], vocab_size=512).save_pretrained(root / "tok")
    base = {
        "model": {"config": TINY, "lr": 1e-3},
        "data": {"tokenizer": str(root / "tok"), "max_length": 128, "batch_size": 2},
        "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 1, "logger": False},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


def parse(command: str, argv: list[str], cwd: Path, monkeypatch) -> MegatronCLI:
    """The CLI as `lightning-megatron <command> <argv>` builds it (parsed and instantiated, not run)."""
    monkeypatch.chdir(cwd)
    return MegatronCLI(command, translate(command, argv))


def as_dict(cli: MegatronCLI) -> dict:
    """The parsed configuration as --print_config writes it (lists, not tuples)."""
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    config.pop("config", None)  # where it was read from, not what it says
    return config


# ------------------------------------------------------------------------ config system
def test_config_files_and_overrides_reach_the_dataclasses(work, monkeypatch):
    (work / "layout.yaml").write_text(
        yaml.safe_dump({"strategy": {"tp": 1, "micro_batch_size": 2, "recompute": {"granularity": "selective"}}})
    )
    (work / "lr.yaml").write_text(yaml.safe_dump({"model": {"lr": 5e-4, "warmup_steps": 2}}))
    argv = ["--config", "base.yaml", "--config", "layout.yaml", "--config", "lr.yaml", "--model.lr", "1e-5"]
    argv += ["--model.config.num_layers", "4", *SELF_COGNITION]
    argv += ["--trainer.callbacks+", "lightning_megatron.callbacks.Freeze", "--trainer.callbacks.freeze_ratio", "0.5"]
    cli = parse("sft", argv, work, monkeypatch)
    assert cli.model.config == GPTConfig(**{**TINY, "num_layers": 4})
    assert cli.model.hparams.lr == 1e-5  # the command line wins over every file
    assert cli.model.hparams.warmup_steps == 2  # the later file adds to the earlier ones
    strategy = cli.trainer.strategy
    assert strategy.parallel.micro_batch_size == 2
    assert strategy.recompute == RecomputeConfig(granularity="selective")
    assert cli.datamodule.sources == ["self-cognition#8"]
    assert cli.datamodule.max_length == 128 and cli.datamodule.model_author == "Tests"
    assert len(cli.datamodule.tokenizer) == 512  # the tokenizer directory was loaded
    assert cli.trainer.max_steps == 3
    (freeze,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Freeze"]  # any callback, by class path
    assert freeze.freeze_ratio == 0.5


def test_swift_command_line_matches_the_canonical_one(work, monkeypatch, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"query": "hi", "response": "hello"}) + "\n")
    swift = f"""
        --config base.yaml --tensor_model_parallel_size 1 --pipeline_model_parallel_size 1
        --context_parallel_size 1 --expert_model_parallel_size 1 --micro_batch_size 2 --sequence_parallel false
        --use_distributed_optimizer --overlap_grad_reduce false --overlap_param_gather false
        --recompute_granularity full --recompute_method uniform --recompute_num_layers 1
        --recompute_modules core_attn mlp --train_iters 7 --max_epochs 2 --eval_interval 5 --eval_iters 3
        --log_interval 2 --clip_grad 1.0 --seed 7 --lr 2e-5 --lr_warmup_iters 3 --lr_decay_style linear
        --weight_decay 0.1 --adam_eps 1e-6 --save {tmp_path / "out"} --save_interval 5 --finetune true
        --async_save False --no_save_optim --no_save_rng --no_load_optim --no_load_rng
        --dataset {data}#3 self-cognition#2 --val_dataset {data} --split_dataset_ratio 0.1 --packing true
        --streaming false --template chatml --model_name Tiny --model_author Tests --tokenizer {work / "tok"}
        --max_length 64 --global_batch_size 4 --train_type full --model_type qwen2
    """.split()
    canonical = f"""
        --config base.yaml --strategy.tp 1 --strategy.pp 1 --strategy.cp 1 --strategy.ep 1
        --strategy.micro_batch_size 2 --strategy.sp false --strategy.use_distributed_optimizer true
        --strategy.overlap_grad_reduce false --strategy.overlap_param_gather false
        --strategy.recompute.granularity full --strategy.recompute.method uniform
        --strategy.recompute.num_layers 1 --strategy.recompute.modules [core_attn,mlp] --trainer.max_steps 7
        --trainer.max_epochs 2 --trainer.val_check_interval 5 --trainer.limit_val_batches 3
        --trainer.log_every_n_steps 2 --trainer.gradient_clip_val 1.0 --seed_everything 7 --model.lr 2e-5
        --model.warmup_steps 3 --model.lr_decay linear --model.weight_decay 0.1 --model.eps 1e-6
        --checkpoint.dirpath {tmp_path / "out"} --checkpoint.every_n_train_steps 5 --checkpoint_io.finetune true
        --checkpoint_io.async_save false --checkpoint_io.no_save_optim true --checkpoint_io.no_save_rng true
        --checkpoint_io.no_load_optim true --checkpoint_io.no_load_rng true
        --data.sources [{data}#3,self-cognition#2] --data.val_sources [{data}] --data.split_dataset_ratio 0.1
        --data.packing true --data.streaming false --data.template chatml --data.model_name Tiny
        --data.model_author Tests --data.tokenizer {work / "tok"} --data.max_length 64 --global_batch_size 4
        --train_type full --preset qwen2
    """.split()
    used = {token[2:] for token in swift if token.startswith("--")}
    elsewhere = {"tp", "pp", "cp", "ep", "virtual_pipeline_model_parallel_size", "expert_tensor_parallel_size"}
    elsewhere |= {"load", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "beta"}  # need a checkpoint,
    untested = set(TRAIN_ALIASES) - used - elsewhere  # LoRA or DPO: see the tests below
    assert not untested, f"add these aliases to this test: {sorted(untested)}"
    config = as_dict(parse("sft", swift, work, monkeypatch))
    assert config == as_dict(parse("sft", canonical, work, monkeypatch))
    assert config["strategy"]["recompute"] == {
        "granularity": "full",
        "method": "uniform",
        "num_layers": 1,
        "modules": ["core_attn", "mlp"],
    }


@pytest.mark.parametrize(
    "swift, canonical",
    [
        (["--tp", "2", "--pp", "2"], ["--strategy.tp", "2", "--strategy.pp", "2"]),
        (["--cp", "2", "--ep", "4"], ["--strategy.cp", "2", "--strategy.ep", "4"]),
        (["--virtual_pipeline_model_parallel_size", "2"], ["--strategy.vpp", "2"]),
        (["--expert_tensor_parallel_size", "1"], ["--strategy.etp", "1"]),
        (["--load", "ckpt"], ["--ckpt_path", "ckpt"]),
        (["--tp=2", "--dataset=a.jsonl"], ["--strategy.tp", "2", "--data.sources", '["a.jsonl"]']),
        (["--model", "hf/dir"], ["--model.hf_source", "hf/dir"]),
        (["--model", "model.yaml"], ["--model", "model.yaml"]),
        (["--lora_rank", "8", "--lora_alpha", "16"], ["--lora.r", "8", "--lora.alpha", "16"]),
        (["--beta", "0.1"], ["--dpo.beta", "0.1"]),
        (["--finetune", "--model.lr", "1"], ["--checkpoint_io.finetune", "true", "--model.lr", "1"]),
        (["--print_config", "--lr", "1"], ["--print_config", "--model.lr", "1"]),
    ],
)
def test_alias_translation(swift, canonical):
    assert translate("sft", swift) == canonical


def test_layout_aliases_reach_the_strategy(work, monkeypatch):
    argv = [
        "--tp",
        "1",
        "--pp",
        "2",
        "--cp",
        "1",
        "--ep",
        "1",
        "--virtual_pipeline_model_parallel_size",
        "2",
        "--expert_tensor_parallel_size",
        "1",
    ]
    parallel = parse(
        "sft", ["--config", "base.yaml", *SELF_COGNITION, *argv], work, monkeypatch
    ).trainer.strategy.parallel
    assert (parallel.tp, parallel.pp, parallel.vpp, parallel.cp, parallel.ep, parallel.etp) == (1, 2, 2, 1, 1, 1)
    assert translate("pt", ["--max_length", "64"]) == ["--data.seq_length", "64"]
    assert LISTS <= set(TRAIN_ALIASES) and SWITCHES - {"stream"} <= set(TRAIN_ALIASES)


def test_print_config_round_trips(work, monkeypatch, capsys):
    argv = [
        "--config",
        "base.yaml",
        "--tp",
        "1",
        "--lr",
        "3e-5",
        "--recompute_granularity",
        "selective",
        *SELF_COGNITION,
    ]
    with pytest.raises(SystemExit) as exit_code:
        parse("sft", argv + ["--print_config"], work, monkeypatch)
    assert exit_code.value.code == 0
    printed = capsys.readouterr().out
    (work / "printed.yaml").write_text(printed)
    assert yaml.safe_load(printed)["model"]["lr"] == 3e-5
    again = parse("sft", ["--config", "printed.yaml"], work, monkeypatch)
    assert as_dict(again) == as_dict(parse("sft", argv, work, monkeypatch))


def test_model_config_and_tokenizer_come_from_the_hf_directory(work, monkeypatch, tmp_path):
    from tests.hf_models import make_hf_model

    hf = make_hf_model("qwen2", tmp_path / "hf")
    train_tokenizer([bundled_corpus()[:20000]], vocab_size=300).save_pretrained(hf)
    cli = parse(
        "sft", ["--model", str(hf), "--model.config.init_method_std", "0.5", *SELF_COGNITION], work, monkeypatch
    )
    expected = GPTConfig.from_hf(hf)
    expected.init_method_std = 0.5  # an explicit override beats the HF value
    assert cli.model.config == expected
    assert cli.model.hparams.hf_source == str(hf)
    assert len(cli.datamodule.tokenizer) == 300


def test_preset_fills_the_model_config(work, monkeypatch):
    run = yaml.safe_load((work / "base.yaml").read_text())
    del run["model"]
    (work / "no_model.yaml").write_text(yaml.safe_dump(run))
    shape = ["--model.config.num_layers", "2", "--model.config.hidden_size", "64", "--model.config.vocab_size", "512"]
    cli = parse(
        "sft", ["--config", "no_model.yaml", *SELF_COGNITION, "--model_type", "qwen3", *shape], work, monkeypatch
    )
    assert cli.model.config == GPTConfig.preset("qwen3", num_layers=2, hidden_size=64, vocab_size=512)


# ----------------------------------------------------------------------------- bad input
def run_main(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as error:  # jsonargparse's own usage errors
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train_type", "qlora"], "--train_type 'qlora' is not supported; choose one of full, lora"),
        (["--dataset", "missing.jsonl#5"], "--dataset missing.jsonl#5: no such file 'missing.jsonl'"),
        (["--data.tokenizer", "no_such_tok"], "tokenizer 'no_such_tok': no such directory"),
        (["--trainer.strategy", "ddp"], "set its options with --strategy.* (e.g. --strategy.tp 2)"),
        (["--global_batch_size", "3", "--micro_batch_size", "2"], "global_batch_size=3 must be a multiple of"),
        (["--lr"], "--lr needs a value"),
        (["--model.config.num_attention_heads", "3"], "num_query_groups=2 must divide num_attention_heads=3"),
        (["--streaming"], "streaming=True reads files as they are: no packing, split_dataset_ratio or '#N'"),
        (["--tp", "2", "--global_batch_size", "4"], "tp*pp*cp=2 needs at least that many processes, not 1"),
        (["--load", "."], "holds no lightning_megatron checkpoint"),
        (["--load", "no_such_dir"], "checkpoint no_such_dir does not exist"),
        (["--tensor_model_parallel_size", "two"], "strategy.tp"),
    ],
)
def test_bad_input_gets_a_clear_error(work, monkeypatch, capsys, argv, message):
    defaults = ["--config", "base.yaml", *SELF_COGNITION]
    code, log = run_main(["sft", *defaults, *argv], work, monkeypatch, capsys)
    assert code == 2 and message in log, log


def test_pretraining_sources_may_be_a_megatron_blend(tmp_path):
    """pt's --dataset takes Megatron's --data-path form: prefixes of .bin/.idx pairs, with weights."""
    from jsonargparse import Namespace

    from lightning_megatron.train_cli import UsageError, check_sources

    for suffix in (".bin", ".idx"):
        (tmp_path / f"a{suffix}").write_bytes(b"")
    prefix = str(tmp_path / "a")
    check_sources("pt", Namespace(sources=["0.7", prefix, "0.3", f"{prefix}.bin"]))
    check_sources("pt", Namespace(sources=[prefix]))
    with pytest.raises(UsageError, match="no such file"):
        check_sources("pt", Namespace(sources=["0.7", prefix, "0.3", str(tmp_path / "b")]))


def test_missing_tokenizer_is_named(work, monkeypatch, capsys):
    (work / "notok.yaml").write_text(yaml.safe_dump({"model": {"config": TINY}}))
    code, log = run_main(["sft", "--config", "notok.yaml", *SELF_COGNITION], work, monkeypatch, capsys)
    assert code == 2 and "pass --model HF_DIR (its tokenizer is used) or --data.tokenizer" in log, log


def test_lora_options_reach_the_lora_callback(work, monkeypatch):
    argv = ["--train_type", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"]
    cli = parse(
        "sft", ["--config", "base.yaml", *SELF_COGNITION, *argv, "--target_modules", "linear_qkv"], work, monkeypatch
    )
    assert (cli.config.lora.r, cli.config.lora.alpha, cli.config.lora.dropout) == (4, 8, 0.1)
    assert list(cli.config.lora.target_modules) == ["linear_qkv"]
    assert any(type(c).__name__ == "LoRA" for c in cli.trainer.callbacks)


def test_dpo_wires_the_dpo_callback_and_preference_data(work, monkeypatch, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    cli = parse("dpo", ["--config", "base.yaml", "--dataset", str(pairs), "--beta", "0.2"], work, monkeypatch)
    assert type(cli.datamodule).__name__ == "PreferenceDataModule" and cli.config.dpo.beta == 0.2
    assert any(type(c).__name__ == "DPO" for c in cli.trainer.callbacks)


def test_infer_needs_a_model(work, monkeypatch, capsys):
    code, log = run_main(["infer"], work, monkeypatch, capsys)
    assert code == 2 and "give --load CHECKPOINT" in log, log


# ------------------------------------------------------------------ training and chatting
def cli(*args, cwd: Path, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_megatron.cli", *map(str, args)],
        cwd=cwd,
        env=job_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """`sft` on one CPU process for 3 steps, saving with --save (a subprocess: the real entry point)."""
    out = cli("sft", "--config", "base.yaml", *SELF_COGNITION, "--save", "out", "--save_interval", "2", cwd=work)
    assert "checkpoints in" in out
    return work / "out"


def test_sft_saves_versioned_checkpoints_and_its_config(trained):
    (version,) = trained.iterdir()
    assert version.name.startswith("v0-")
    steps = sorted(
        json.loads((p / "lightning_megatron.json").read_text())["global_step"]
        for p in version.glob("*.ckpt")
        if not p.is_symlink()
    )
    assert steps[-1] == 3  # saved at the end even though 3 is not a multiple of save_interval
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["config"]["num_layers"] == 2 and Path(saved["data"]["tokenizer"]).is_absolute()


def chat_reply(out: str, query: str) -> str:
    """The reply printed after the echoed ``<<< query`` line."""
    return out.split(f"<<< {query}\n", 1)[1].split("\n<<< ", 1)[0]


def chat_in_process(argv: list[str], lines: str, cwd: Path, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out = run_main(["infer", *argv], cwd, monkeypatch, capsys)
    assert code == 0, out
    return out


@pytest.mark.multiprocess
def test_infer_streams_the_same_reply_under_tp1_and_tp2(trained, work, monkeypatch, capsys):
    query = "who are you?"
    argv = ["--load", "out", "--max_new_tokens", "8"]
    one = chat_in_process(argv, f"{query}\nclear\n{query}\n", work, monkeypatch, capsys)
    reply = chat_reply(one, query)
    assert reply.strip(), one
    assert one.count(f"<<< {query}\n{reply}\n") == 2  # after `clear` the same question gets the same answer
    two = cli("infer", *argv, "--tensor_model_parallel_size", "2", cwd=work, stdin=f"{query}\n")
    assert chat_reply(two, query) == reply


def test_infer_with_an_hf_model_matches_transformers_greedy_decoding(work, monkeypatch, capsys, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.hf_models import make_hf_model

    hf = make_hf_model("qwen2", tmp_path / "hf", vocab_size=512)
    tokenizer = AutoTokenizer.from_pretrained(work / "tok")
    tokenizer.save_pretrained(hf)
    query = "Tell me a story."
    reply = chat_reply(
        chat_in_process(["--model", str(hf), "--max_new_tokens", "10"], f"{query}\n", work, monkeypatch, capsys),
        query,
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False
    )
    prompt = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    stop = sorted({tokenizer.eos_token_id, *tokenizer.all_special_ids})
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    expected = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert reply == expected.rstrip("\ufffd") and reply


def test_pt_trains_with_a_global_batch(work, monkeypatch, capsys, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text(bundled_corpus()[:20000])
    config = yaml.safe_load((work / "base.yaml").read_text())
    del config["data"]["max_length"]  # SFT's name; pretraining has seq_length (SWIFT's --max_length maps to it)
    (tmp_path / "pt.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", "pt.yaml", "--dataset", str(docs), "--max_length", "32", "--train_iters", "2"]
    argv += ["--global_batch_size", "4", "--micro_batch_size", "2", "--save", "out", "--add_version", "false"]
    code, log = run_main(["pt", *argv], tmp_path, monkeypatch, capsys)
    assert code == 0, log
    (saved,) = (tmp_path / "out").glob("*.ckpt")
    info = json.loads((saved / "lightning_megatron.json").read_text())
    assert info["global_step"] == 2 and info["consumed_samples"] == 8  # 2 steps of the global batch of 4


def test_finetune_from_an_exported_checkpoint_starts_from_the_hf_weights(work, monkeypatch, tmp_path):
    """Megatron-SWIFT's flow: `export --to-mcore`, then `sft --load CKPT --finetune` (model config
    and tokenizer from the checkpoint): the first loss equals that of `sft --model HF_DIR`."""
    from lightning_megatron.cli import to_mcore
    from tests.hf_models import make_hf_model

    hf = make_hf_model("qwen2", tmp_path / "hf", vocab_size=512)
    train_tokenizer([bundled_corpus()[:60000]], vocab_size=512).save_pretrained(hf)
    to_mcore(str(hf), str(tmp_path / "mcore"))
    run = {
        "data": {"max_length": 128, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    common = ["--config", "run.yaml", *SELF_COGNITION, "--train_iters", "1"]
    losses = []
    for source in (["--model", str(hf)], ["--load", "mcore", "--finetune"]):
        cli = parse("sft", [*common, *source], tmp_path, monkeypatch)
        assert cli.model.config == GPTConfig.from_hf(hf)
        cli.run()
        losses.append(float(cli.trainer.callback_metrics["train/loss"]))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)  # 6.81 here; a fresh init gives about ln(512) = 6.24


@pytest.mark.multiprocess
def test_sft_under_tp2_finetunes_from_the_saved_checkpoint(trained, work):
    out = cli(
        "sft",
        "--config",
        "base.yaml",
        *SELF_COGNITION,
        "--load",
        "out",
        "--finetune",
        "--tp",
        "2",
        "--trainer.devices",
        "2",
        "--train_iters",
        "2",
        "--save",
        "out_tp2",
        "--add_version",
        "false",
        cwd=work,
    )
    assert "checkpoints in" in out
    (saved,) = (work / "out_tp2").glob("*.ckpt")
    info = json.loads((saved / "lightning_megatron.json").read_text())
    assert info["layout"]["tp"] == 2 and info["global_step"] == 2  # finetune restarts at step 0


def test_dpo_with_lora_trains_and_saves_adapters(work, monkeypatch, capsys, tmp_path):
    """`lightning-megatron dpo --train_type lora`: a real run, saving an adapter-only checkpoint."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{a} + {a}?", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--config", str(work / "base.yaml"), "--dataset", str(pairs), "--train_type", "lora", "--lora_rank", "4"]
    argv += [
        "--micro_batch_size",
        "2",
        "--train_iters",
        "2",
        "--beta",
        "0.2",
        "--save",
        "out",
        "--add_version",
        "false",
    ]
    code, log = run_main(["dpo", *argv], tmp_path, monkeypatch, capsys)
    assert code == 0, log
    (saved,) = (tmp_path / "out").glob("*.ckpt")
    info = json.loads((saved / "lightning_megatron.json").read_text())
    assert info["partial_model"] and info["lora"]["r"] == 4 and info["global_step"] == 2
