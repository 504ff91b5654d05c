"""experiments.chinchilla_c4 and experiments.fineweb_edu on synthetic shards of their corpora's layouts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments import chinchilla_c4, fineweb_edu
from jaxlm.config import ModelConfig, TrainConfig
from tests.corpora import write_c4, write_fineweb


def _small(experiment, data, tmp_path):
    """The experiment's data config on the given shards, with a model and batch that run on a CPU in seconds."""
    model = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, vocab_size=320, max_seq_len=32)
    data = dataclasses.replace(data, vocab_size=300, seq_len=32, batch_size=8, num_workers=0, prepare_workers=1,
                               tokenizer_sample_bytes=50_000, cache_dir=str(tmp_path / "cache"))
    train = TrainConfig(steps=2, eval_every=2, eval_steps=1, ckpt_every=2, log_every=1, samples=0,
                        out_dir=str(tmp_path / "run"))
    return dataclasses.replace(experiment, model=model, data=data, train=train)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["c4", "fineweb_edu"])
def test_corpus_experiment_trains_on_synthetic_shards(which, tmp_path):
    from jaxlm.train import train

    if which == "c4":
        write_c4(str(tmp_path / "c4"), train_files=3, val_files=1, docs_per_file=40)
        member = chinchilla_c4.SWEEP[0]
        data = dataclasses.replace(
            member.data, source=f"shards:{tmp_path}/c4/en/c4-train.*.json.gz",
            val_source=f"{tmp_path}/c4/en/c4-validation.*.json.gz",
        )
        experiment = dataclasses.replace(member, model=dataclasses.replace(member.model, attention="auto"))
    else:
        write_fineweb(str(tmp_path / "fineweb-edu"), files=3, docs_per_file=80)
        experiment = fineweb_edu.EXPERIMENT
        # The experiment's hash split keeps 0.1% for validation; a few hundred documents need a larger share.
        data = dataclasses.replace(experiment.data, source=f"shards:{tmp_path}/fineweb-edu/sample/10BT/*.parquet",
                                   val_fraction=0.2)
    summary = train(_small(experiment, data, tmp_path))
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["val_loss"])


def test_corpus_experiments_read_shards():
    assert fineweb_edu.EXPERIMENT.data.source.startswith("shards:")
    assert fineweb_edu.EXPERIMENT.model.n_layers == 12 and fineweb_edu.EXPERIMENT.model.d_model == 768
    for member in chinchilla_c4.SWEEP:
        assert member.data.val_source.endswith("c4-validation.*.json.gz")
