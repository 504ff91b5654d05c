"""tools.plot_runs reads run directories as the train loop writes them, and refuses what is not one."""

import dataclasses
import json

import pytest

from experiments.quickstart import EXPERIMENT as LLAMA
from experiments.quickstart_gpt2 import EXPERIMENT as GPT2
from jaxlm.flops import flops_per_token
from tools import plot_runs


def _write_run(run_dir, experiment, rows):
    run_dir.mkdir()
    experiment = dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, steps=20))
    (run_dir / "config.json").write_text(experiment.to_json())
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return experiment


def _rows(tokens_per_step, losses, val_losses):
    rows = []
    for i, loss in enumerate(losses, 1):
        rows.append({"step": 2 * i, "tokens": 2 * i * tokens_per_step, "loss": loss, "tokens_per_sec": 1000.0 * i})
    for i, val in enumerate(val_losses):
        rows.append({"step": 4 * i, "val_loss": val, "val_bpb": val / 2})
    return rows


def test_table_and_plot_of_two_runs(tmp_path, capsys):
    tps = GPT2.data.batch_size * GPT2.data.seq_len
    gpt2 = _write_run(tmp_path / "gpt2", GPT2, _rows(tps, [5.0, 4.5, 4.0, 3.9, 3.8], [6.0, 4.2, 4.4]))
    # A resumed run logs step 10 twice: the later row is the one that counts.
    resumed = _rows(tps, [5.5, 5.0, 4.8, 4.6, 4.9], [6.1, 4.9]) + [{"step": 10, "tokens": 10 * tps, "loss": 4.7}]
    _write_run(tmp_path / "llama", LLAMA, resumed)
    out = tmp_path / "plots" / "compare.png"
    assert plot_runs.main([str(tmp_path / "gpt2"), str(tmp_path / "llama"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    gpt2_row = next(line.split() for line in table if line.split()[:1] == ["gpt2"])
    llama_row = next(line.split() for line in table if line.split()[:1] == ["llama"])
    # steps done/planned, tokens, last train loss, last and best validation loss, median tokens/s
    assert gpt2_row[3:] == ["10/20", f"{10 * tps:,}", "3.8000", "4.4000", "4.2000", "3,000"]
    assert llama_row[3:6] == ["10/20", f"{10 * tps:,}", "4.7000"]

    run = plot_runs.load_run(str(tmp_path / "gpt2"), x="flops")
    per_step = tps * flops_per_token(gpt2.model, gpt2.data.seq_len)
    assert run["val_x"] == pytest.approx([0, 4 * per_step, 8 * per_step])
    assert plot_runs.load_run(str(tmp_path / "gpt2"), x="step")["train_x"] == [2, 4, 6, 8, 10]


def test_what_is_not_a_run_is_one_line_and_status_2(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "missing")]) == 2
    assert plot_runs.main([str(tmp_path)]) == 2  # no config.json
    _write_run(tmp_path / "empty", GPT2, [])
    assert plot_runs.main([str(tmp_path / "empty")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "not a directory" in errors[0] and "config.json" in errors[1] and "no logged steps" in errors[2]
