"""Evaluation against numpy over the model's logits: corpus loss, perplexity, bits per byte; multiple choice."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import evaluate as ev
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, TrainConfig
from jaxlm.data import make_iterator, prepare_data
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.errors import DataError
from jaxlm.model import forward, init_params

TOK = ByteTokenizer()
MODEL = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=260, max_seq_len=48)


def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def params():
    return jax.jit(lambda key: init_params(MODEL, key))(jax.random.key(0))


_forward = jax.jit(lambda params, tokens: forward(MODEL, params, tokens))


def full_width_log_probs(params, seq):
    """Log-probabilities [len(seq) - 1, V] of one sequence, run alone; padded on the right to the model's
    context so that one compilation serves every sequence (a causal model's earlier positions ignore it)."""
    inputs = np.zeros((1, MODEL.max_seq_len), np.int32)
    inputs[0, : len(seq) - 1] = seq[:-1]
    return log_softmax(_forward(params, jnp.asarray(inputs))[0])[: len(seq) - 1]


def sentence(rng, n):
    return " ".join("".join(rng.choice(list("abcdefgh"), rng.integers(1, 6))) for _ in range(n))


def numpy_ending_logprob(params, context, ending):
    """log p(ending | context) from one unpadded forward pass, summed in numpy."""
    ctx = [TOK.eos_id, *TOK.encode(context)]
    end = TOK.encode(" " + ending)
    seq = np.array(ctx + end)
    logp = full_width_log_probs(params, seq)
    return sum(logp[t - 1, seq[t]] for t in range(len(ctx), len(seq)))


def test_multiple_choice_matches_numpy(params, tmp_path):
    rng = np.random.default_rng(0)
    records = [
        {"ctx": sentence(rng, 3), "endings": [sentence(rng, int(rng.integers(1, 4))) for _ in range(4)],
         "label": int(rng.integers(0, 4))}
        for _ in range(6)
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = ev.read_choices(str(path))
    scores, truncated = ev.ending_logprobs(MODEL, params, TOK, items, batch_size=5)
    assert truncated == 0
    reference = [np.array([numpy_ending_logprob(params, r["ctx"], e) for e in r["endings"]]) for r in records]
    for got, want in zip(scores, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    labels = np.array([r["label"] for r in records])
    lengths = [np.array([len(" " + e) for e in r["endings"]]) for r in records]
    result = ev.score_choices(MODEL, params, TOK, items, batch_size=5)
    assert result["accuracy"] == pytest.approx(np.mean([np.argmax(s) for s in reference] == labels))
    normed = [np.argmax(s / n) for s, n in zip(reference, lengths)]
    assert result["accuracy_norm"] == pytest.approx(np.mean(normed == labels))
    assert result["chance"] == 0.25 and result["items"] == 6


def test_long_context_loses_its_start(params):
    ending = "end"
    context = "x" * 100  # 101 tokens with the leading eos; the model reads 48
    item = ev.ChoiceItem(context, (ending, "other"), 0)
    scores, truncated = ev.ending_logprobs(MODEL, params, TOK, [item])
    assert truncated == 1
    end = TOK.encode(" " + ending)
    seq = np.array(([TOK.eos_id] + TOK.encode(context))[-(49 - len(end)):] + end)
    assert len(seq) == 49
    logp = full_width_log_probs(params, seq)
    want = sum(logp[t - 1, seq[t]] for t in range(49 - len(end), 49))
    assert scores[0][0] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "line,message",
    [
        ({"ctx": "a", "endings": ["b", "c"]}, "missing field 'label'"),
        ({"ctx": "a", "endings": ["b"], "label": 0}, "at least two"),
        ({"ctx": "a", "endings": ["b", "c"], "label": 2}, "outside the 2 endings"),
        ({"ctx": "a", "endings": ["b", "c"], "label": "x"}, "not an index"),
    ],
)
def test_bad_choice_files(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": "1"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"mc.jsonl:2: .*{message}"):
        ev.read_choices(str(path))


def corpus_experiment(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i}.txt").write_text(sentence(rng, 60) + "\n")
    data = DataConfig(
        source=f"text:{folder}/*.txt", tokenizer="byte", seq_len=32, batch_size=4, val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    return Experiment(name="ev", model=MODEL, data=data, train=TrainConfig(), mesh=MeshConfig(data=1))


def test_lm_metrics_match_numpy(params, tmp_path):
    experiment = corpus_experiment(tmp_path)
    result = ev.lm_metrics(experiment, params, split="validation")
    prepared = prepare_data(experiment.data)
    total = count = 0.0
    batches = 0
    for batch in make_iterator(experiment.data, prepared, split="validation", seed=0, epochs=1, shuffle_rows=True):
        logp = log_softmax(_forward(params, jnp.asarray(batch["inputs"])))
        total -= np.take_along_axis(logp, batch["targets"][..., None], -1).sum()
        count += batch["targets"].size
        batches += 1
    assert batches > 1 and result["batches"] == batches and result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # ASCII through a byte tokenizer: one byte per token, so bits per byte is the loss in bits.
    assert result["bytes_per_token"] == 1.0
    assert result["bits_per_byte"] == pytest.approx(total / count / math.log(2), rel=1e-5)
    two = ev.lm_metrics(experiment, params, split="train", batches=2)
    assert two["batches"] == 2 and two["tokens"] == 2 * 4 * 32


def test_tool_scores_a_saved_run(params, tmp_path, capsys):
    from jaxlm.checkpoint import save_params, write_or_check_config
    from tools.evaluate import main

    experiment = corpus_experiment(tmp_path)
    experiment = Experiment(**{**experiment.__dict__, "train": TrainConfig(steps=1, out_dir=str(tmp_path / "run"))})
    write_or_check_config(experiment)
    save_params(experiment, params)
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"ctx": "ab", "endings": ["cd", "ef", "gh"], "label": 2}) + "\n")
    out = tmp_path / "new" / "r.json"  # its directory is created
    result = main(["--run", str(tmp_path / "run"), "--hellaswag", str(path), "--out", str(out)])
    assert result["items"] == 1 and json.loads(out.read_text())["accuracy"] == result["accuracy"]
    result = main(["--run", str(tmp_path / "run"), "--batches", "1"])
    assert result["batches"] == 1 and result["tokens"] == 4 * 32
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(tmp_path / "run"), "--hellaswag", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}/missing.jsonl does not exist: give a .jsonl file")


def test_tool_checks_out_before_evaluating(tmp_path, capsys):
    from tools.evaluate import main

    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path, "is a directory"), (tmp_path / "a_file" / "r.json", "a_file is a file")]
    for out, message in cases:  # the run does not exist: --out is checked first
        with pytest.raises(SystemExit) as exit_info:
            main(["--run", str(tmp_path / "missing"), "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out}") and message in err[0]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m tools.evaluate ")
