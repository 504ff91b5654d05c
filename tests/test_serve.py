"""Text in, text out with a Hugging Face tokenizer.json: a GPT-2-shaped model sampled by `tools.sample --hf`,
imported and exported with its tokenizer by tools.convert_hf, served by `tools.serve --run` as a real process
over HTTP, and evaluated by `tools.evaluate --generate` with that server as its judge. Token ids and texts come
from transformers' tokenizer where it can give them; the expected new tokens are the model's greedy generations
computed here in-process (tests/test_hf.py checks those against transformers' generation)."""

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.generate import generate
from tests.test_hf_tokenizer import _byte_level_bpe
from tests.devices import use_first_devices
from tests.processes import process_env

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A GPT-2-shaped jaxlm run with a byte-level BPE tokenizer.json, served by `python -m tools.serve --run`."""
    from jaxlm.config import ModelConfig
    from jaxlm.data.tokenizer import load_hf_tokenizer, save_hf_tokenizer
    from jaxlm.hf import save_hf
    from jaxlm.model import init_params
    from tools.convert_hf import to_jaxlm

    root = tmp_path_factory.mktemp("serve")
    bare = _byte_level_bpe()
    vocab_size = bare.get_vocab_size()
    cfg = ModelConfig(family="gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=vocab_size, max_seq_len=320,
                      init_std=0.5)  # room for the judge's request
    params = jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)))  # eager: slower
    eos = bare.token_to_id("<|endoftext|>")
    save_hf(cfg, params, str(root / "hf"), bos_id=eos, eos_id=eos)  # GPT-2: both are <|endoftext|>
    bare.save(str(root / "hf" / "tokenizer.json"))
    tokenizer = load_hf_tokenizer(str(root / "hf" / "tokenizer.json"))  # bos and eos from config.json
    save_hf_tokenizer(tokenizer, str(root / "hf"))  # and a tokenizer_config.json that names them
    run = to_jaxlm(str(root / "hf"), str(root / "run"))  # the tokenizer goes into run/tokenizer
    server = subprocess.Popen(
        [sys.executable, "-m", "tools.serve", "--run", run, "--port", "0", "--model-name", "tiny", "--quiet",
         "--batch-wait-ms", "50"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=process_env(),
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving tiny on http://"), line + server.stderr.read()
        url = line.split()[3]
        yield {"url": url, "run": run, "cfg": cfg, "params": params, "tokenizer": tokenizer, "root": root}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _greedy(served, prompt_ids: list[int], n: int, eos: bool = True) -> str:
    tok = served["tokenizer"]
    new = generate(served["cfg"], served["params"], [prompt_ids], max_new_tokens=n,
                   eos_id=tok.eos_id if eos else None, bucketed=True)[0]  # the server's shapes: compiled once for both
    return tok.decode(prompt_ids + new)[len(tok.decode(prompt_ids)):]


def test_sample_tool_takes_and_prints_text(served, capsys):
    from tools.sample import main as sample

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(served["root"] / "hf"))
    prompt = "def add(a, b):"
    sample(["--hf", str(served["root"] / "hf"), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0",
            "--ignore-eos"])
    printed = "".join(capsys.readouterr().out.splitlines(keepends=True)[1:])[:-1]  # print() added the last newline
    ids = [hf_tok.bos_token_id, *hf_tok.encode(prompt, add_special_tokens=False)]  # GPT-2: <|endoftext|> first
    new = generate(served["cfg"], served["params"], [ids], max_new_tokens=8)[0]
    expected = hf_tok.decode(ids + new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert printed == expected and expected.startswith(prompt) and len(expected) > len(prompt)


def test_export_keeps_the_tokenizer(served):
    from tools.convert_hf import from_run

    exported = from_run(served["run"], str(served["root"] / "exported"))
    again = transformers.AutoTokenizer.from_pretrained(exported)
    text = "Grüße aus Köln,  東京 🦊\n\tdone"
    assert again.encode(text, add_special_tokens=False) == served["tokenizer"].encode(text)
    assert (again.bos_token_id, again.eos_token_id) == (served["tokenizer"].eos_id,) * 2


def test_models_completions_and_chat(served):
    url, tok = served["url"], served["tokenizer"]
    with urllib.request.urlopen(url + "/models") as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny"]

    prompt = "def add(a, b):"
    status, out = _post(url + "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200 and out["object"] == "text_completion"
    expected = _greedy(served, [tok.eos_id, *tok.encode(prompt)], 8)
    assert out["choices"][0]["text"] == expected and expected
    assert out["usage"]["prompt_tokens"] == 1 + len(tok.encode(prompt))

    # Streamed: the text in the event-stream format; with ignore_eos, the text of all 8 tokens, eos or not.
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True}
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url + "/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [line[len("data: "):] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == _greedy(served, [tok.eos_id, *tok.encode(prompt)], 8, eos=False)
    assert chunks[-1]["finish_reason"] == "length"

    from jaxlm.finetune import chat_prompt_ids

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    status, out = _post(url + "/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 8,
                                                    "temperature": 0})
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == _greedy(served, chat_prompt_ids(tok, messages), 8)

    status, out = _post(url + "/completions", {"prompt": "x" * 2000, "max_tokens": 8})
    assert status == 400 and "context of 320 tokens" in out["error"]["message"]
    status, out = _post(url + "/completions", {"prompt": prompt, "temperature": -1})
    assert status == 400 and "temperature" in out["error"]["message"]
    status, out = _post(url + "/nothing", {})
    assert status == 404


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    url, tok = served["url"], served["tokenizer"]
    prompts = ["import os", "The quick brown fox", "for name in", "Grüße aus Köln,", "def", "return a + b"]
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as response:
        before = json.loads(response.read())
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(
            lambda i: _post(url + "/completions", {"prompt": prompts[i], "max_tokens": 5 + i // 2, "temperature": 0}),
            range(len(prompts)),
        ))
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as response:
        after = json.loads(response.read())
    assert after["rows"] - before["rows"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)  # some requests shared a batch
    for i, (status, out) in enumerate(answers):
        assert status == 200
        assert out["choices"][0]["text"] == _greedy(served, [tok.eos_id, *tok.encode(prompts[i])], 5 + i // 2), i
        assert out["usage"]["completion_tokens"] <= 5 + i // 2


def test_evaluate_generate_scores_exact_match_and_asks_the_judge(served, capsys):
    from jaxlm.generations import judge_messages
    from tools.evaluate import main as evaluate

    tok = served["tokenizer"]
    root = served["root"]
    matching = _greedy(served, [tok.eos_id, *tok.encode("def add(a, b):")], 8)
    items = [{"prompt": "def add(a, b):", "reference": f"  {matching}\n"},  # the model's own answer: a match
             {"prompt": "import os", "reference": "something else"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    result = evaluate(["--run", served["run"], "--generate", str(root / "prompts.jsonl"), "--max-new-tokens", "8",
                       "--judge-url", served["url"], "--judge-model", "tiny", "--out", str(root / "gen.json")])
    assert result["items"] == 2 and result["exact_match"] == 0.5
    rows = [json.loads(line) for line in open(result["responses"])]
    assert [r["exact_match"] for r in rows] == [True, False] and rows[0]["response"] == matching
    for row in rows:  # the judge's reply is the server's answer to the judge's request
        status, out = _post(served["url"] + "/chat/completions", {
            "model": "tiny", "messages": judge_messages(row["prompt"], row["reference"], row["response"]),
            "temperature": 0, "max_tokens": 16,
        })
        assert status == 200 and row["judge_reply"] == out["choices"][0]["message"]["content"]
    assert json.loads((root / "gen.json").read_text())["judge_model"] == "tiny"
    with pytest.raises(SystemExit):
        evaluate(["--run", served["run"], "--generate", str(root / "prompts.jsonl"),
                  "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "tiny"])
    assert "cannot be reached" in capsys.readouterr().err


def test_finetuning_from_the_hugging_face_directory_reads_text_with_its_tokenizer(served, tmp_path, monkeypatch):
    """Instruction tuning started from the directory takes its text through the directory's tokenizer.json (the
    run's own `byte` tokenizer would give other ids, within the model's vocabulary: silently wrong), and the
    tuned run answers in text."""
    from jaxlm import finetune as ft_lib
    from jaxlm.config import DataConfig, Experiment, OptimConfig, TrainConfig
    from jaxlm.finetune import FinetuneConfig
    from jaxlm.finetune.data import alpaca_prompt

    hf = str(served["root"] / "hf")
    records = [{"instruction": "Complete the function.", "input": f"def add{i}(a, b):", "output": "    return a + b"}
               for i in range(8)]
    for name, rows in (("train", records), ("val", records[:2])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = Experiment(
        name="ft", data=DataConfig(tokenizer="byte", seq_len=64, batch_size=4, cache_dir=str(tmp_path / "cache")),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=2, eval_every=2, out_dir=str(tmp_path / "ft"), init_from=hf, tensorboard=False),
    )
    ft = FinetuneConfig(task="instruct", train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "val.jsonl"),
                        max_len=192, samples=2)
    use_first_devices(monkeypatch, 1)
    ft_lib.train_finetune(exp, ft)

    run_exp, _ = ft_lib.load_lm(str(tmp_path / "ft"))
    assert run_exp.data.tokenizer == hf and run_exp.model.vocab_size == served["cfg"].vocab_size
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf, "tokenizer.json"))
    prompt = alpaca_prompt(records[0]["instruction"], records[0]["input"]) + records[0]["output"]
    assert ft_lib.load_tokenizer(run_exp).encode(prompt) == fast(prompt, add_special_tokens=False)["input_ids"]
    samples = (tmp_path / "ft" / "samples.txt").read_text()
    assert records[0]["input"] in samples and records[1]["input"] in samples  # prompts decoded back to text

    with pytest.raises(ConfigError, match="holds its own tokenizer"):
        other = dataclasses.replace(exp, data=dataclasses.replace(exp.data, tokenizer=str(tmp_path / "t.json")))
        ft_lib.load_base(other)
