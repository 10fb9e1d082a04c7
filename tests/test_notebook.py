"""examples/quickstart.ipynb executes top to bottom on CPU: two fits in one kernel, the chat,
and TP=2 over ranks forked from the kernel."""

from __future__ import annotations

import json

import nbclient
import nbformat
import pytest

from tests.conftest import ROOT, job_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.examples]

PROBE = """
import json
print("PROBE " + json.dumps({
    "losses": curve.losses,
    "forked": trainer.callback_metrics["loss_curve"].tolist() if can_fork else None,
    "answers": chat.answers,
}))
"""


def test_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    # A test-only last cell reads the results out of the kernel (plots or tables alike).
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=job_env())
    text = "".join(out.get("text", "") for out in notebook.cells[-1].outputs)
    probe = json.loads(text.split("PROBE ", 1)[1])
    losses = probe["losses"]
    steps = len(losses) // 2
    assert len(losses) == 2 * steps and steps > 0
    assert sum(losses[-3:]) < sum(losses[:3])  # the second fit continued from the first
    assert set(probe["answers"]) == {"who are you?", "What is your name?"}
    # The forked TP=2 run trains a fresh model from the same seed and data: the same curve as the
    # first single-process fit (tensor parallelism does not change the math).
    assert probe["forked"] == pytest.approx(losses[:steps], abs=1e-3)
