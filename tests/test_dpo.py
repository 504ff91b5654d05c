"""Preference tuning (DPO): the loss and its gradient against numpy on a tiny model, pair files, and a run on the
one training loop whose reference stays the starting model, through a resume."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import load_params
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.errors import ConfigError, DataError
from jaxlm.finetune import FinetuneConfig, PreferenceTuning, answer_logprobs, apply_model, load_base, read_preferences
from jaxlm.model import init_params
from jaxlm.train import fit

WORDS = ["alpha", "beta", "gamma", "delta", "sum", "list", "zero", "one"]
BETA = 0.3


def write_pairs(path, n, seed, chat=False):
    """Reverse-the-words pairs: chosen is the reversal, rejected the words as given."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = list(rng.choice(WORDS, size=rng.integers(2, 5)))
            prompt, good, bad = "Reverse: " + " ".join(words), " ".join(words[::-1]), " ".join(words)
            if chat:
                record = {"prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": good}],
                          "rejected": [{"role": "assistant", "content": bad}]}
            else:
                record = {"prompt": prompt, "chosen": good, "rejected": bad}
            f.write(json.dumps(record) + "\n")
    return str(path)


def experiment(out_dir, steps=6):
    model = ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=260,
                        max_seq_len=96, dropout=0.0)
    return Experiment(
        name="dpo", model=model, data=DataConfig(tokenizer="byte", seq_len=32, batch_size=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
        train=TrainConfig(steps=steps, eval_every=3, log_every=1, ckpt_every=3, seed=3, out_dir=str(out_dir)),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return {"train": write_pairs(root / "train.jsonl", 16, 0), "chat": write_pairs(root / "chat.jsonl", 8, 1, True)}


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_logps(logits, rows, side):
    """log p(answer) per row from logits, and d logp / d logits."""
    logp = log_softmax(logits.astype(np.float64))
    targets, weights = rows[f"{side}_targets"], rows[f"{side}_weights"]
    onehot = np.eye(logits.shape[-1])[targets]
    value = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum(1)
    return value, weights[..., None] * (onehot - np.exp(logp))


@pytest.mark.slow
def test_dpo_loss_and_gradient_match_numpy(files):
    cfg = experiment("unused").model
    ft = FinetuneConfig(task="dpo", train_file=files["chat"], max_len=80, dpo_beta=BETA)
    rows = read_preferences(files["chat"], ByteTokenizer(), ft).rows(ft.max_len, ByteTokenizer().pad_id)
    rows["valid"][-1] = 0.0  # a padding pair counts for nothing
    init_two = jax.jit(jax.vmap(lambda key: init_params(cfg, key)))  # compiled: an eager init is the slow part
    two_models = init_two(jax.random.split(jax.random.key(0)))
    policy, reference = (jax.tree.map(lambda x, i=i: x[i], two_models) for i in range(2))
    task = PreferenceTuning(experiment("unused"), ft)

    @jax.jit
    def both_logits(params):
        return tuple(logits(params, side) for side in ("chosen", "rejected"))

    def logits(params, side):
        return apply_model(cfg, params, rows[f"{side}_inputs"], positions_BT=rows[f"{side}_positions"],
                           segment_ids_BT=rows[f"{side}_segment_ids"])

    lp, dlp, ref = {}, {}, {}
    for side, of_policy, of_reference in zip(("chosen", "rejected"), both_logits(policy), both_logits(reference)):
        lp[side], dlp[side] = numpy_logps(np.asarray(of_policy), rows, side)
        ref[side], _ = numpy_logps(np.asarray(of_reference), rows, side)
    margin = BETA * ((lp["chosen"] - ref["chosen"]) - (lp["rejected"] - ref["rejected"]))
    valid = rows["valid"]
    expected = np.sum(np.log1p(np.exp(-margin)) * valid)

    loss_fn = lambda p: task.loss(p, {"reference": reference}, rows, None)  # noqa: E731
    (value, count), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(policy)
    assert float(count) == valid.sum()
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert abs(expected / valid.sum() - math.log(2)) > 0.01  # policy and reference differ: not the trivial log 2

    # The gradient: numpy's d loss / d logits, carried back through the model's own vector-Jacobian product.
    d_margin = -valid / (1.0 + np.exp(margin))  # d softplus(-m) / dm
    cotangent = tuple((d_margin * sign * BETA)[:, None, None] * dlp[side]
                      for side, sign in (("chosen", 1.0), ("rejected", -1.0)))
    carried_back = jax.jit(lambda p, c: jax.vjp(both_logits, p)[1](c)[0])
    reference_grads = carried_back(policy, tuple(np.asarray(c, np.float32) for c in cotangent))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)


def test_pairs_files(files, tmp_path):
    ft = FinetuneConfig(task="dpo", train_file=files["train"], max_len=80)
    tok = ByteTokenizer()
    plain, chat = read_preferences(files["train"], tok, ft), read_preferences(files["chat"], tok, ft)
    assert len(plain) == 16 and plain.layouts == ("chat",) and len(chat) == 8
    # Only the answer and its end token count; both sides share the prompt's tokens.
    first = plain.ids["chosen"][0]
    answer = plain.chosen[0]
    assert plain.weights["chosen"][0].sum() == len(tok.encode(answer)) + 1
    n_prompt = len(first) - len(tok.encode(answer)) - 1
    np.testing.assert_array_equal(first[:n_prompt], plain.ids["rejected"][0][:n_prompt])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'rejected'"):
        read_preferences(str(bad), tok, ft)
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": [{"role": "user", "content": "z"}]}) + "\n")
    with pytest.raises(DataError, match="'rejected' must be a string or a list of messages ending with the assistant"):
        read_preferences(str(bad), tok, ft)
    with pytest.raises(ConfigError, match="dpo_beta must be positive"):
        FinetuneConfig(task="dpo", train_file=files["train"], dpo_beta=0.0)


@pytest.mark.slow
def test_a_dpo_run_measures_against_the_starting_model_through_a_resume(files, tmp_path):
    ft = FinetuneConfig(task="dpo", train_file=files["train"], val_file=files["train"], max_len=80, dpo_beta=BETA,
                        samples=0)
    run = tmp_path / "run"
    # On a mesh of two devices, not the session's eight: still a data-sharded run, at a fraction of the cost.
    mesh_devices = jax.devices()[:2]
    summary = fit(PreferenceTuning(experiment(run), ft), devices=mesh_devices)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    # At step 0 the policy is the reference: every margin is 0 and the loss log 2.
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["val_margin"] == 0.0 and evals[0]["val_reward_accuracy"] == 0.0
    assert evals[6]["val_reward_accuracy"] > 0.5 and evals[6]["val_margin"] > 0
    assert summary["validation"]["reward_accuracy"] == pytest.approx(evals[6]["val_reward_accuracy"])

    # The implicit rewards at the end are beta (log pi_final - log pi_start): the reference is the start.
    start = load_base(experiment(run))[1]
    _, final = load_params(str(run))
    data = read_preferences(files["train"], ByteTokenizer(), ft).rows(ft.max_len, ByteTokenizer().pad_id)
    cfg = experiment(run).model
    logps = jax.jit(lambda params: answer_logprobs(cfg, params, data, "chosen"))
    chosen = BETA * (np.asarray(logps(final)) - np.asarray(logps(start)))
    assert evals[6]["val_chosen_reward"] == pytest.approx(float(np.mean(chosen)), rel=1e-4, abs=1e-6)

    # Resumed from step 3, the run ends as the uninterrupted one did (the reference rebuilt from the start).
    shutil.rmtree(run / "checkpoints" / "6")
    os.remove(run / "summary.json")
    fit(PreferenceTuning(experiment(run), ft), devices=mesh_devices)
    again = [json.loads(line) for line in open(run / "metrics.jsonl")]
    pick = lambda rs: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rs if r["step"] > 3]  # noqa: E731
    np.testing.assert_allclose(np.array(pick(again), dtype=float), np.array(pick(rows), dtype=float), rtol=1e-5)


def test_demo_pairs_reject_another_functions_docstring():
    from experiments.dpo_docstrings import preference_pairs

    examples = [{"messages": [{"role": "user", "content": f"def f{i}(): ..."},
                              {"role": "assistant", "content": f"Doc {i % 5}."}]} for i in range(12)]
    pairs = preference_pairs(examples, seed=0)
    # Every prompt keeps its own docstring as the chosen answer; the rejected one is another function's, and
    # functions sharing a docstring (i and i + 5 here) are never paired.
    assert 0 < len(pairs) <= 12
    for pair in pairs:
        i = int(pair["prompt"][0]["content"][5:].split("(")[0])
        assert pair["chosen"][0]["content"] == f"Doc {i % 5}."
        assert pair["rejected"][0]["content"] != pair["chosen"][0]["content"]
    assert len({p["rejected"][0]["content"] for p in pairs}) > 1
