"""Finetuning: classification (pooling, heads, last-k, balance, files, errors) and instruction tuning (masking,
packing, templates, LoRA runs, outputs), on tiny random-weight models with the byte tokenizer."""

import csv
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import finetune as ft_lib
from jaxlm import lora as lora_lib
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.errors import CheckpointError, ConfigError, DataError
from jaxlm.finetune import FinetuneConfig
from jaxlm.model import forward
from jaxlm.model import init_params as _init_params
from safetensors.numpy import load_file

TOK = ByteTokenizer()
# Jitted once per model and shape: run eagerly, each of their operations would be compiled on its own.
init_params = jax.jit(_init_params, static_argnums=0)
response_losses = jax.jit(ft_lib.response_losses, static_argnums=0)
MODEL = ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=260, max_seq_len=128)


def experiment(tmp_path, name="ft", steps=40, model=MODEL, **train_kw) -> Experiment:
    return Experiment(
        name=name, model=model,
        data=DataConfig(tokenizer="byte", seq_len=32, batch_size=8, cache_dir=str(tmp_path / "cache")),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0),
        train=TrainConfig(steps=steps, eval_every=1000, log_every=10, out_dir=str(tmp_path / name), tensorboard=False,
                          **train_kw),
        mesh=MeshConfig(),
    )


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def vowel_rows(n, seed):
    """Random letters: 'low' texts drawn from a-m, 'high' texts from n-z (the model must read them to tell)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["low", "high"][i % 2]
        letters = "abcdefghijklm" if label == "low" else "nopqrstuvwxyz"
        rows.append(("".join(rng.choice(list(letters), rng.integers(3, 9))), label))
    return rows


# ------------------------------------------------------------------------------------------------ the model side


@jax.jit
def _hidden_and_logits(params, x):
    return ft_lib.apply_model(MODEL, params, x, hidden=True), forward(MODEL, params, x)


@pytest.mark.slow
def test_hidden_states_are_the_output_projection_input():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 260, (2, 10)), jnp.int32)
    params = init_params(MODEL, jax.random.key(0))
    hidden, logits = map(np.asarray, _hidden_and_logits(params, x))
    assert hidden.shape == (2, 10, MODEL.d_model)
    # Tied embeddings: logits = hidden @ E^T.
    np.testing.assert_allclose(hidden @ np.asarray(params["embed"]["embedding"]).T, logits, atol=1e-4)
    llama = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, vocab_size=260, max_seq_len=64)
    params = init_params(llama, jax.random.key(0))
    hidden, logits = jax.jit(lambda p: (ft_lib.apply_model(llama, p, x, hidden=True), forward(llama, p, x)))(params)
    np.testing.assert_allclose(np.asarray(hidden) @ np.asarray(params["lm_head"]["kernel"]), logits, atol=1e-4)


def test_classifier_reads_the_last_real_token_and_ignores_padding():
    params = {k: v for k, v in init_params(MODEL, jax.random.key(0)).items() if k != "lm_head"}
    head = {"kernel": np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32), "bias": np.arange(3.0)}
    seq = [TOK.eos_id, *TOK.encode("hello"), TOK.eos_id]
    n = len(seq)
    rows = np.array([seq + [0] * 5, seq + [123] * 5], np.int32)  # two different paddings
    classifier_logits = jax.jit(ft_lib.classifier_logits, static_argnums=0)
    logits = np.asarray(classifier_logits(MODEL, {"model": params, "head": head}, {}, rows, np.array([n, n])))
    hidden = np.asarray(_hidden_and_logits(params, jnp.asarray([seq]))[0])[0, -1]
    expected = hidden @ np.asarray(head["kernel"]) + np.arange(3.0)
    np.testing.assert_allclose(logits, np.stack([expected, expected]), atol=1e-5)


# --------------------------------------------------------------------------------------------- classification


@pytest.mark.slow
def test_classifier_learns_and_reports(tmp_path):
    train = write_csv(tmp_path / "train.csv", vowel_rows(96, 0))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t, "label": label} for t, label in vowel_rows(32, 1)])
    test = write_csv(tmp_path / "test.tsv", vowel_rows(40, 2), delimiter="\t")
    ft = FinetuneConfig(task="classify", train_file=train, val_file=val, test_file=test, max_len=16)
    summary = ft_lib.train_finetune(experiment(tmp_path, steps=60), ft)
    run = tmp_path / "ft"
    assert json.loads((run / "labels.json").read_text())["labels"] == ["high", "low"]
    assert summary["test"]["majority_baseline"] == pytest.approx(0.5)
    assert summary["validation"]["accuracy"] >= 0.9
    # The confusion matrix and accuracy agree with predictions made afresh from the saved run.
    classifier = ft_lib.load_classifier(str(run))
    texts, labels = zip(*vowel_rows(40, 2))
    predicted = classifier.predict(list(texts))
    matrix = np.zeros((2, 2), int)
    for t, p in zip(labels, predicted):
        matrix[["high", "low"].index(t), ["high", "low"].index(p)] += 1
    saved = json.loads((run / "confusion.json").read_text())
    assert saved["split"] == "test" and saved["matrix"] == matrix.tolist()
    assert summary["test"]["accuracy"] == pytest.approx(np.trace(matrix) / 40)
    # A second call finds the finished run instead of training again.
    assert ft_lib.train_finetune(experiment(tmp_path, steps=60), ft)["wall_s"] == summary["wall_s"]


@pytest.mark.slow
def test_train_last_k_moves_only_the_last_blocks(tmp_path):
    train = write_csv(tmp_path / "train.csv", vowel_rows(32, 0))
    ft = FinetuneConfig(task="classify", train_file=train, max_len=16, train_last_k=1)
    exp = experiment(tmp_path, steps=5)
    summary = ft_lib.train_finetune(exp, ft)
    start = jax.jit(lambda key: init_params(MODEL, key))(jax.random.key(exp.train.seed))  # as load_base does
    saved = load_file(str(tmp_path / "ft" / "classifier.safetensors"))
    assert not any(k.startswith("model/lm_head") for k in saved)
    for name, value in saved.items():
        if not name.startswith("model/"):
            continue
        keys = name.split("/")[1:]
        before = start
        for k in keys:
            before = before[k]
        before = np.asarray(before)
        if keys[0] == "blocks":
            np.testing.assert_array_equal(value[0], before[0])  # layer 0 frozen
            assert not np.array_equal(value[1], before[1]), name  # layer 1 trained
        elif keys[0] == "final_norm":
            assert not np.array_equal(value, before)
        else:
            np.testing.assert_array_equal(value, before)  # embeddings frozen
    D, L, F = 32, 1, 128
    block = 4 * (D * D + D) + 2 * 2 * D + (D * F + F) + (F * D + D)
    assert summary["trainable_params"] == L * block + 2 * D + (D * 2 + 2)


def test_balanced_sampling_draws_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    data = ft_lib.ClassifySplit(np.zeros((100, 4), np.int32), np.ones(100, np.int32), labels, 0)
    for balanced, share in ((True, 0.5), (False, 0.1)):
        it = ft_lib.EpochBatches(lambda e: ft_lib.classify_epoch(data, 0, e, balanced), 50)
        drawn = np.concatenate([next(it)["labels"] for _ in range(40)])
        assert drawn.mean() == pytest.approx(share, abs=0.03)


def test_truncation_counts_or_fails(tmp_path):
    rows = [("x" * 40, "a"), ("short", "b"), ("y" * 3, "a")]
    path = write_csv(tmp_path / "t.csv", rows)
    ft = FinetuneConfig(train_file=path, max_len=12)
    table = ft_lib.read_table(path, ("text", "label"))
    data = ft_lib.encode_classify(table, path, TOK, ft, ["a", "b"])
    assert data.truncated == 1
    assert data.lengths.tolist() == [12, 7, 5]
    assert data.tokens[0, -1] == TOK.eos_id and data.tokens[0, 0] == TOK.eos_id
    with pytest.raises(DataError, match=r"t.csv:2: the example is 42 tokens, longer than max_len=12"):
        ft_lib.encode_classify(table, path, TOK, dataclasses.replace(ft, truncate=False), ["a", "b"])


def run_cli(exp, ft, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ft_lib.run_finetune(exp, ft, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1
    return err


def test_bad_inputs_are_one_line_and_status_2(tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    val = write_csv(tmp_path / "val.csv", [("a", "x"), ("c", "z")])
    exp = experiment(tmp_path, steps=2)
    ft = FinetuneConfig(train_file=train, val_file=val, max_len=16)
    err = run_cli(exp, ft, [], capsys)
    assert "val.csv:3: unknown label 'z'" in err
    no_val = dataclasses.replace(ft, val_file="")
    extra_class = dataclasses.replace(no_val, labels=("x", "y", "w"))
    err = run_cli(exp, extra_class, ["--train.out_dir", str(tmp_path / "b")], capsys)
    assert "class 'w' has no training example" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    err = run_cli(exp, dataclasses.replace(no_val, train_file=bad), ["--train.out_dir", str(tmp_path / "c")], capsys)
    assert "bad.jsonl:2: missing field 'label'" in err
    err = run_cli(exp, ft, ["--finetune.max_len", "1000"], capsys)
    assert "max_len=1000 is beyond the model's context of 128" in err
    err = run_cli(exp, ft, ["--finetune.task", "summarise"], capsys)
    assert "task='summarise'" in err
    err = run_cli(exp, ft, ["--finetune.text_column", "body", "--train.out_dir", str(tmp_path / "d")], capsys)
    assert "has no column 'body'" in err


def test_init_from_a_run_checks_model_and_tokenizer(tmp_path):
    base = experiment(tmp_path, name="base", steps=3)
    params = init_params(MODEL, jax.random.key(7))
    from jaxlm.checkpoint import save_params, write_or_check_config

    write_or_check_config(base)
    save_params(base, params)
    child = experiment(tmp_path, name="child", init_from=str(tmp_path / "base"))
    _, loaded = ft_lib.load_base(child)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = dataclasses.replace(child, model=dataclasses.replace(MODEL, d_model=64))
    with pytest.raises(CheckpointError, match="does not match this run's model"):
        ft_lib.load_base(wider)
    other = dataclasses.replace(child, data=dataclasses.replace(child.data, tokenizer="char"))
    with pytest.raises(ConfigError, match="data.tokenizer='byte'"):
        ft_lib.load_base(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        ft_lib.load_base(experiment(tmp_path, name="x", init_from=str(tmp_path / "missing")))


@pytest.mark.slow
def test_init_from_a_hugging_face_directory_and_instruct_last_k(tmp_path):
    """A Hugging Face directory initialises a run, which records and trains that model; and an instruction-tuning
    run with train_last_k=1 (the same run) saves a loadable language model whose other blocks and (tied) embedding
    did not move."""
    from jaxlm.checkpoint import load_params
    from jaxlm.hf import save_hf

    llama = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=260,
                        max_seq_len=64, tie_embeddings=True)
    start = init_params(llama, jax.random.key(3))
    save_hf(llama, start, str(tmp_path / "hf"))
    exp = experiment(tmp_path, steps=3, init_from=str(tmp_path / "hf"))  # its own model section is replaced
    loaded_exp, loaded = ft_lib.load_base(exp)
    assert loaded_exp.model == llama
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    train = write_jsonl(tmp_path / "train.jsonl", instruct_records(16, 0))
    ft = FinetuneConfig(task="instruct", train_file=train, max_len=64, train_last_k=1, samples=0)
    summary = ft_lib.train_finetune(exp, ft)
    run_exp, run_params = ft_lib.load_lm(str(tmp_path / "ft"))
    assert run_exp.model == dataclasses.replace(llama, remat=exp.model.remat)
    _, params = load_params(str(tmp_path / "ft"))  # a plain jaxlm checkpoint: every tool can load it
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, run_params) == jax.tree.map(np.shape, start)
    for path, after in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        before = start
        for k in keys:
            before = before[k]
        before, after = np.asarray(before), np.asarray(after)
        if keys[0] == "blocks":
            np.testing.assert_array_equal(after[0], before[0])
            assert not np.array_equal(after[1], before[1]), keys
        elif keys[0] == "final_norm":
            assert not np.array_equal(after, before)
        else:  # the tied embedding is also the output matrix, and stays frozen with the input side
            np.testing.assert_array_equal(after, before)
    D, KV, F = 32, 2 * 8, 64  # one block: q, k, v, o; two RMS norm scales; SwiGLU gate, up, down
    assert summary["trainable_params"] == (D * D + 2 * D * KV + D * D) + 2 * D + 3 * D * F + D  # and the final norm


# --------------------------------------------------------------------------------------------- instruction tuning


def test_only_response_tokens_are_targets():
    layout, segments = ft_lib.template_segments(
        {"instruction": "Add.", "input": "1 2", "output": "3"}, "auto", "f:1"
    )
    assert layout == "alpaca"
    ids, weights = ft_lib.encode_segments(TOK, segments)
    prompt = "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"
    assert TOK.decode(ids) == prompt + "3"
    assert ids[0] == TOK.eos_id and ids[-1] == TOK.eos_id
    rows = ft_lib.pack_rows([np.array(ids)], [np.array(weights, np.float32)], 64, TOK.pad_id, pack=False)
    targets = rows["targets"][0][rows["weights"][0] == 1]
    assert TOK.decode(targets) == "3" and targets[-1] == TOK.eos_id
    assert rows["weights"].sum() == 2


def test_chat_layout_trains_every_assistant_turn():
    messages = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"},
    ]
    layout, segments = ft_lib.template_segments({"messages": messages}, "auto", "f:1")
    assert layout == "chat"
    ids, weights = ft_lib.encode_segments(TOK, segments)
    trained = np.array(ids)[np.array(weights) == 1]
    assert TOK.decode(trained) == "hellook" and list(trained).count(TOK.eos_id) == 2
    # The prompt of the first reply is what the generation template gives for the conversation so far.
    assert ft_lib.chat_prompt(messages[:2]) == "### System:\nBe brief.\n\n### User:\nhi\n\n### Assistant:\n"
    prefix = ft_lib.prompt_ids(TOK, ft_lib.chat_prompt(messages[:2]))
    assert ids[: len(prefix)] == prefix
    # Later in the conversation the earlier reply is closed by its end token, as in training.
    prefix = ft_lib.chat_prompt_ids(TOK, messages[:4])
    assert ids[: len(prefix)] == prefix and TOK.decode(ids[len(prefix):]) == "ok"


@pytest.mark.parametrize(
    "record,message",
    [
        ({"instruction": "x"}, "missing field 'output'"),
        ({"prompt": "x"}, "neither 'instruction'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "needs a role"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_instruct_lines(tmp_path, record, message):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}, record])
    with pytest.raises(DataError, match=f"i.jsonl:2: .*{message}"):
        ft_lib.read_instruct(path, TOK, FinetuneConfig(task="instruct", train_file=path))


def instruct_records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(list("abcdef"), rng.integers(2, 5)))
        out.append({"instruction": f"Repeat {word} twice.", "output": word + word})
    return out


@pytest.mark.slow
def test_packing_keeps_examples_apart(tmp_path):
    """The response loss of packed rows equals that of one example per row: no example sees another."""
    path = write_jsonl(tmp_path / "i.jsonl", instruct_records(9, 0))
    ft = FinetuneConfig(task="instruct", train_file=path, max_len=128)
    data = ft_lib.read_instruct(path, TOK, ft)
    padded = ft_lib.pack_rows(data.ids, data.weights, 128, TOK.pad_id, pack=False)
    packed = ft_lib.pack_rows(data.ids, data.weights, 128, TOK.pad_id, pack=True)
    assert len(packed["inputs"]) < len(padded["inputs"]) == 9
    assert packed["segment_ids"].max() > 1
    row = packed["positions"][0][packed["segment_ids"][0] == 2]
    assert row.tolist() == list(range(len(row)))
    params = init_params(MODEL, jax.random.key(0))
    sums = [response_losses(MODEL, params, rows) for rows in (padded, packed)]
    assert float(sums[0][1]) == float(sums[1][1]) == sum(float(w[1:].sum()) for w in data.weights)
    assert float(sums[0][0]) == pytest.approx(float(sums[1][0]), rel=1e-5)
    # Without the segment ids the packed examples would see each other and the loss would change.
    rows = len(packed["inputs"])
    leaky = dict(packed, segment_ids=np.ones((rows, 128), np.int32), positions=np.tile(np.arange(128), (rows, 1)))
    assert abs(float(response_losses(MODEL, params, leaky)[0]) - float(sums[0][0])) > 1e-3


def test_response_loss_matches_numpy(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", instruct_records(3, 1))
    data = ft_lib.read_instruct(path, TOK, FinetuneConfig(task="instruct", train_file=path, max_len=128))
    params = init_params(MODEL, jax.random.key(0))
    rows = ft_lib.pack_rows(data.ids, data.weights, 128, TOK.pad_id, pack=False)
    total, count = response_losses(MODEL, params, rows)
    ref_total = ref_count = 0.0
    one = jax.jit(lambda p, x: forward(MODEL, p, x))
    for ids, w in zip(data.ids, data.weights):
        # Each example alone, right-padded to one width so one compilation serves all (causal: padding is unseen).
        inputs = np.zeros((1, 128), np.int32)
        inputs[0, : len(ids) - 1] = ids[:-1]
        logits = np.asarray(one(params, inputs), np.float64)[0, : len(ids) - 1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        ref_total += float((nll * w[1:]).sum())
        ref_count += float(w[1:].sum())
    assert float(count) == ref_count
    assert float(total) == pytest.approx(ref_total, rel=1e-5)


def test_instruct_truncation(tmp_path):
    long = {"instruction": "i" * 40, "output": "o" * 20}
    no_room = {"instruction": "i" * 80, "output": "o"}
    path = write_jsonl(tmp_path / "i.jsonl", [long, no_room, {"instruction": "a", "output": "b"}])
    ft = FinetuneConfig(task="instruct", train_file=path, max_len=80)
    data = ft_lib.read_instruct(path, TOK, ft)
    assert (data.truncated, data.dropped, len(data)) == (2, 1, 2)
    assert len(data.ids[0]) == 81
    with pytest.raises(DataError, match="i.jsonl:1: the example is"):
        ft_lib.read_instruct(path, TOK, dataclasses.replace(ft, truncate=False))


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_instruct_run_lowers_response_loss_and_saves_a_language_model(tmp_path, lora_rank):
    train = write_jsonl(tmp_path / "train.jsonl", instruct_records(64, 0))
    val = write_jsonl(tmp_path / "val.jsonl", instruct_records(16, 1))
    ft = FinetuneConfig(
        task="instruct", train_file=train, val_file=val, max_len=96, pack=True, samples=2, sample_tokens=8,
        lora_rank=lora_rank, lora_alpha=8.0, lora_targets=("query", "value", "fc", "proj"),
    )
    # Frozen embeddings of std 0.02 cap the logits near zero: a larger init lets adapters alone move them.
    model = dataclasses.replace(MODEL, init_std=0.2)
    exp = experiment(tmp_path, steps=30, model=model)
    if lora_rank:
        exp = dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, lr=3e-2, min_lr=3e-3))
    summary = ft_lib.train_finetune(exp, ft)
    assert summary["validation_loss_after"] < summary["validation_loss_before"] - 0.5
    assert len(summary["samples"]) == 2
    run = str(tmp_path / "ft")
    loaded_exp, params = ft_lib.load_lm(run)
    assert loaded_exp.model == model
    data = ft_lib.read_instruct(val, TOK, ft)
    rows = ft_lib.pack_rows(data.ids, data.weights, 96, TOK.pad_id, pack=True)
    total, count = response_losses(model, params, rows)
    assert float(total / count) == pytest.approx(summary["validation_loss_after"], rel=1e-4)
    if lora_rank:
        saved = load_file(os.path.join(run, "adapters.safetensors"))
        assert {k.rsplit("/", 1)[1] for k in saved} == {"lora_a", "lora_b"}
        D, F, L = 32, 128, 2
        formula = L * 4 * (2 * (D + D) + (D + F) + (F + D))  # rank 4 on query, value (D x D), fc, proj
        assert sum(v.size for v in saved.values()) == summary["trainable_params"] == formula
    else:
        from jaxlm.checkpoint import load_params

        _, direct = load_params(run)  # a plain jaxlm checkpoint: every tool can load it
        for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_parse_applies_both_sections(tmp_path):
    exp = experiment(tmp_path)
    ft = FinetuneConfig(train_file="t.csv")
    argv = ["--optim.lr", "0.5", "--finetune.lora_rank", "4", "--finetune.lora_targets", "query", "fc"]
    e, f = ft_lib.parse(exp, ft, argv)
    assert e.optim.lr == 0.5 and f.lora_rank == 4 and f.lora_targets == ("query", "fc")
    assert f.lora == lora_lib.LoraSpec(4, 16.0, 0.0, ("query", "fc"))


def test_user_prompt_follows_the_run_layout(tmp_path):
    assert ft_lib.user_prompt("x", "alpaca") == "### Instruction:\nx\n\n### Response:\n"
    assert ft_lib.user_prompt("x") == "### User:\nx\n\n### Assistant:\n"
    (tmp_path / "summary.json").write_text(json.dumps({"layouts": ["alpaca"]}))
    assert ft_lib.run_layout(str(tmp_path)) == "alpaca"


@pytest.mark.slow
def test_lora_classifier_stores_only_adapters_and_head(tmp_path):
    train = write_csv(tmp_path / "train.csv", vowel_rows(64, 0))
    test = write_csv(tmp_path / "test.csv", vowel_rows(24, 2))
    ft = FinetuneConfig(train_file=train, test_file=test, max_len=16, lora_rank=2, lora_targets=("query", "fc"))
    summary = ft_lib.train_finetune(experiment(tmp_path, steps=10), ft)
    saved = load_file(str(tmp_path / "ft" / "classifier.safetensors"))
    assert {k.split("/")[0] for k in saved} == {"lora", "head"}
    D, F, L = 32, 128, 2
    assert sum(v.size for v in saved.values()) == summary["trainable_params"] == L * 2 * (2 * D + D + F) + D * 2 + 2
    classifier = ft_lib.load_classifier(str(tmp_path / "ft"))  # base weights come from init_from (fresh here)
    texts, labels = zip(*vowel_rows(24, 2))
    accuracy = np.mean(np.array(classifier.predict(list(texts))) == np.array(labels))
    assert accuracy == pytest.approx(summary["test"]["accuracy"])


@pytest.mark.slow
def test_chat_sampling_warns_when_the_run_was_not_instruction_tuned(tmp_path, monkeypatch, capsys):
    from tools.sample import main as sample

    model = dataclasses.replace(MODEL, n_layers=1)
    base = experiment(tmp_path, name="base", steps=3, model=model)
    params = init_params(model, jax.random.key(0))
    monkeypatch.setattr(ft_lib, "load_lm", lambda path: (base, params))  # a pretraining run, without its checkpoint
    run = str(tmp_path / "base")
    os.makedirs(run)
    assert not ft_lib.instruction_tuned(run)
    sample(["--run", run, "--prompt", "x", "--chat", "--max-new-tokens", "2", "--temperature", "0"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {run} was not instruction-tuned")
    assert captured.out.startswith("--- sample 0")  # and it goes on
    (tmp_path / "base" / "finetune.json").write_text(json.dumps({"task": "instruct"}))
    assert ft_lib.instruction_tuned(run) and ft_lib.instruction_tuned(os.path.join(run, "checkpoints", "3"))
    (tmp_path / "base" / "finetune.json").write_text(json.dumps({"task": "classify"}))
    assert not ft_lib.instruction_tuned(run)


def test_usage_line_names_the_module(tmp_path, monkeypatch, capsys):
    import sys
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="experiments.finetune_classify")
    monkeypatch.setitem(sys.modules, "__main__", main)
    with pytest.raises(SystemExit):
        ft_lib.parse(experiment(tmp_path), FinetuneConfig(train_file="t.csv"), ["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m experiments.finetune_classify ")
