"""tools.lm_eval: a jaxlm run evaluated by lm-evaluation-harness on tasks defined by local YAML and JSONL files
(no network), compared with jaxlm's own multiple-choice scorer, uncached generation, a numpy loss and
tools.evaluate's loss on the same text."""

import json
import os
import textwrap

import jax
import numpy as np
import pytest

from jaxlm import evaluate as ev
from jaxlm.checkpoint import load_params, save_params, write_or_check_config
from jaxlm.config import DataConfig, Experiment, ModelConfig, TrainConfig
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.generate import generate_uncached
from jaxlm.model import forward, init_params
from tests.devices import use_first_devices

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "spam", "eggs", "ham"]
CONTEXT = 64  # the model's max_seq_len: the long rolling text needs two windows


def write_task(folder, name, data_file, body):
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"test_split: test\n" + textwrap.dedent(body)
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny byte-level run (random weights, saved as a run), three local tasks, and tools.lm_eval's results."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    rng = np.random.default_rng(0)
    exp = Experiment(
        name="harness",
        model=ModelConfig(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=260,
                          max_seq_len=CONTEXT),
        data=DataConfig(tokenizer="byte", seq_len=32, batch_size=8),
        train=TrainConfig(steps=1, out_dir=str(tmp / "run")),
    )
    write_or_check_config(exp)
    save_params(exp, jax.jit(init_params, static_argnums=0)(exp.model, jax.random.key(0)))

    choices = [{"ctx": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))),
                "endings": [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(3)],
                "label": int(rng.integers(0, 3))} for _ in range(16)]
    texts = [" ".join(rng.choice(WORDS, size=n)) for n in (3, 8, 25)]  # the last: 2 windows of 64 bytes
    prompts = [" ".join(rng.choice(WORDS, size=4)) + " " for _ in range(6)]
    tasks = tmp / "tasks"
    tasks.mkdir()
    write_jsonl(tmp / "choice.jsonl", choices)
    write_jsonl(tmp / "rolling.jsonl", [{"text": t} for t in texts])
    write_task(tasks, "tiny_choice", tmp / "choice.jsonl", """\
        output_type: multiple_choice
        doc_to_text: "{{ctx}}"
        doc_to_choice: "{{endings}}"
        doc_to_target: "{{label}}"
        metric_list:
          - metric: acc
        """)
    write_task(tasks, "tiny_rolling", tmp / "rolling.jsonl", """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: bits_per_byte
            aggregation: bits_per_byte
            higher_is_better: false
        """)
    # The answers: what uncached greedy decoding (an independent path) gives for the first half, wrong ones after.
    _, params = load_params(exp.run_dir)
    tok = ByteTokenizer()
    reference = [
        tok.decode(ids).split(".")[0]
        for ids in generate_uncached(exp.model, params, [[tok.eos_id, *tok.encode(p)] for p in prompts],
                                     max_new_tokens=10, eos_id=tok.eos_id)
    ]
    answers = [r if i < 3 else r + "!" for i, r in enumerate(reference)]
    write_jsonl(tmp / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    write_task(tasks, "tiny_gen", tmp / "gen.jsonl", """\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: 10
          do_sample: false
        metric_list:
          - metric: exact_match
        """)
    from tools.lm_eval import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")  # everything the tasks need is local
        mp.setenv("HF_HUB_OFFLINE", "1")
        # The tool's mesh over two devices, not the session's eight: still a batch split over a mesh, at a fraction
        # of the compile and run time.
        use_first_devices(mp, 2)
        record = main(["--run", exp.run_dir, "--include-path", str(tasks), "--tasks",
                       "tiny_choice,tiny_rolling,tiny_gen", "--batch-size", "8", "--log-samples"])
    return exp, params, tok, choices, texts, reference, record


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_results_are_written_into_the_run_directory(evaluated):
    exp, *_, record = evaluated
    with open(os.path.join(exp.run_dir, "lm_eval.json")) as f:
        written = json.load(f)
    assert written["results"] == json.loads(json.dumps(record["results"]))
    assert written["documents"] == 16 + 3 + 6 and written["documents_per_sec"] > 0


@pytest.mark.slow
def test_multiple_choice_matches_jaxlm_scorer(evaluated):
    exp, params, tok, choices, *_, record = evaluated
    items = [ev.ChoiceItem(c["ctx"], tuple(c["endings"]), c["label"]) for c in choices]
    ours = ev.score_choices(exp.model, params, tok, items)
    assert record["results"]["tiny_choice"]["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    scores, _ = ev.ending_logprobs(exp.model, params, tok, items)
    samples = sorted(record["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    for sample, want in zip(samples, scores):
        got = [ll for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


jitted_forward = jax.jit(forward, static_argnums=0)


def numpy_rolling_loglikelihood(cfg, params, ids, start_id):
    """log p(ids | start) with each token predicted once, from as much context as the model holds."""
    seq = [start_id, *ids]
    total, predicted = 0.0, 0
    while predicted < len(ids):
        end = min(predicted + cfg.max_seq_len, len(ids))
        begin = max(0, end - cfg.max_seq_len)
        logits = np.asarray(jitted_forward(cfg, params, np.asarray([seq[begin:end]], np.int32)))[0]
        logits = logits.astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for j in range(predicted, end):  # target ids[j] is predicted at input position j - begin
            total += logp[j - begin, ids[j]]
        predicted = end
    return total


@pytest.mark.slow
def test_rolling_loglikelihood_matches_numpy_loss(evaluated):
    exp, params, tok, _, texts, *_, record = evaluated
    assert len(tok.encode(texts[-1])) > CONTEXT  # this one is scored in two windows
    samples = sorted(record["samples"]["tiny_rolling"], key=lambda s: s["doc_id"])
    total_ll, total_bytes = 0.0, 0
    for sample, text in zip(samples, texts):
        want = numpy_rolling_loglikelihood(exp.model, params, tok.encode(text), tok.eos_id)
        got = sample["filtered_resps"][0]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got == pytest.approx(want, rel=1e-5)
        total_ll, total_bytes = total_ll + want, total_bytes + len(text.encode())
    bpb = record["results"]["tiny_rolling"]["bits_per_byte,none"]
    assert bpb == pytest.approx(-total_ll / total_bytes / np.log(2), rel=1e-5)


@pytest.mark.slow
def test_generation_on_the_kv_cache_matches_uncached_decoding(evaluated):
    *_, reference, record = evaluated
    samples = sorted(record["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == reference
    assert record["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)


@pytest.mark.slow
def test_bad_requests_are_one_line_errors(evaluated, capsys):
    exp, *_ = evaluated
    from tools.lm_eval import main

    for argv, message in (
        (["--tasks", "x"], "one of --run"),
        (["--run", exp.run_dir, "--tasks", "x", "--include-path", os.path.join(exp.run_dir, "nowhere")], "not a folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err


@pytest.mark.slow
def test_rolling_windows_predict_every_token_once():
    from lm_eval.api.instance import Instance

    from jaxlm.harness import JaxlmLM

    cfg = ModelConfig(family="llama", n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, vocab_size=260, max_seq_len=16)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))  # compiled: eager init is slower
    tok = ByteTokenizer()
    texts = ["spam and eggs, " * 3, "ham"]  # 45 bytes: three windows of the model's 16 positions; 3 bytes: one
    model = JaxlmLM(cfg, params, tok, [tok.eos_id], batch_size=4)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = model.loglikelihood_rolling(requests)
    want = [numpy_rolling_loglikelihood(cfg, params, tok.encode(t), tok.eos_id) for t in texts]
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # prepares a corpus and compiles tools.evaluate's loss
def test_rolling_loglikelihood_equals_tools_evaluate_loss_on_the_same_text(evaluated, tmp_path, capsys):
    """tools.evaluate packs a split into rows of seq_len + 1 tokens and scores each row's tokens after its first;
    the harness scores a text after the start token (eos). They score the same predictions when the split is one
    document D of seq_len + 1 tokens (its one row; the eos after it falls outside) and the text is D without its
    first character c, provided the model cannot tell c from eos at the first position: here eos's input embedding
    is made c's (the output layer is untied and unchanged)."""
    from lm_eval.api.instance import Instance

    from jaxlm.harness import JaxlmLM
    from tools.evaluate import main as evaluate
    from tools.lm_eval import Args, load_model

    exp, params, tok, *_ = evaluated
    rng = np.random.default_rng(7)
    document = "c" + "".join(rng.choice(list("abcdefgh (x):="), size=CONTEXT))  # seq_len + 1 = 65 bytes
    # Logits far from uniform (the fixture's random model predicts nearly evenly), so that a token scored in
    # another context would show.
    peaked = {**params, "lm_head": jax.tree.map(lambda w: 30 * np.asarray(w), params["lm_head"])}
    embedding = np.asarray(params["embed"]["embedding"]).copy()
    embedding[tok.eos_id] = embedding[ord("c")]
    blind = {**peaked, "embed": {"embedding": embedding}}
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "some train text " * 8}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": document}) + "\n")
    run = Experiment(
        name="same_text", model=exp.model,
        data=DataConfig(source=f"shards:{tmp_path}/train.jsonl", val_source=f"{tmp_path}/val.jsonl", tokenizer="byte",
                        seq_len=CONTEXT, batch_size=1, cache_dir=str(tmp_path / "cache"), prepare_workers=1),
        train=TrainConfig(steps=1, out_dir=str(tmp_path / "run")),
    )
    write_or_check_config(run)
    save_params(run, blind)

    result = evaluate(["--run", run.run_dir])
    assert result["tokens"] == CONTEXT and result["batches"] == 1  # the one row: D's 64 tokens after its first

    cfg, loaded, tokenizer, start_ids, _ = load_model(Args(tasks="", run=run.run_dir))
    assert start_ids == [tok.eos_id]
    harness = JaxlmLM(cfg, loaded, tokenizer, start_ids, batch_size=1)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(document[1:],), idx=0)
    [rolling] = harness.loglikelihood_rolling([request])
    print(f"rolling {-rolling / CONTEXT:.6f}, tools.evaluate {result['loss']:.6f}")
    assert -rolling / CONTEXT == pytest.approx(result["loss"], rel=1e-5)
    # Without the blinding, the two differ: the check above is not a coincidence of the construction.
    harness = JaxlmLM(cfg, peaked, tokenizer, start_ids, batch_size=1)
    assert -harness.loglikelihood_rolling([request])[0] / CONTEXT != pytest.approx(result["loss"], rel=1e-3)
