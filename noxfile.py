"""`nox -s demo` runs the demo, `nox -s tests` the test suite, `nox -s bench` the GPU training
benchmark (docs/benchmarks.md), on a fresh machine.

On machines without CUDA the CPU build of torch (2.13.0) is installed first, so nothing else
resolves a multi-GB CUDA build.
"""

import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
CPU_TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str) -> None:
    if shutil.which("nvidia-smi") is None:
        session.install(CPU_TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite: unit, multi-process (CPU/gloo) and parity tests; GPU tests skip without CUDA."""
    _install(session, "test")
    session.run("python", "-m", "pytest", "-q", "-ra", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """SFT with TP=2 on self-cognition + arithmetic data, export to HF, ask transformers "who are you?"."""
    _install(session, "test")
    session.run("python", "examples/sft_demo.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Training throughput on one GPU: Hugging Face vs lightning_megatron (Trainer) vs a bare
    Megatron loop, dense and MoE; arguments go to benchmarks/train_throughput.py (e.g. --shapes dense)."""
    _install(session, "test")
    session.run("python", "benchmarks/train_throughput.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting (configured in pyproject.toml)."""
    session.install("ruff>=0.6")
    paths = ["lightning_megatron", "callbacks", "tests", "benchmarks", "examples", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
