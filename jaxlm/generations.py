"""Generation-based evaluation: greedy responses to prompts with reference answers, scored by exact match and by
a judge model reached through any OpenAI-compatible chat endpoint (`tools.serve`, vLLM, OpenAI)."""

from __future__ import annotations

import json
import os
import re
import string
import urllib.error
import urllib.request
from typing import Any

from jaxlm import storage
from jaxlm.config import Experiment
from jaxlm.errors import ConfigError, DataError

JUDGE_SYSTEM = (
    "You grade answers. Given a request, a reference answer and a response, reply with one word: CORRECT if the "
    "response gives the reference answer (in any wording), INCORRECT otherwise."
)
_VERDICT = re.compile(r"\b(INCORRECT|CORRECT)\b", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def read_prompts(path: str) -> list[dict[str, str]]:
    """Items {prompt, reference, instruction, input} of a JSONL file in the prompt/reference or Alpaca layout."""
    if not storage.isfile(path):
        raise DataError(f"--generate {path} does not exist: give a JSONL file of prompts and reference answers")
    items = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where} is not JSON: each line must be one object") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        prompt = record.get("prompt", record.get("instruction"))
        reference = record.get("reference", record.get("output"))
        extra = record.get("input") or ""
        if not all(isinstance(x, str) for x in (prompt, reference, extra)):
            raise DataError(
                f"{where}: needs string fields prompt and reference (or instruction, optional input, and output)"
            )
        items.append({"prompt": prompt, "input": extra, "reference": reference})
    if not items:
        raise DataError(f"--generate {path} holds no prompts: add JSON lines with prompt and reference")
    return items


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation, articles and extra spaces (SQuAD's answer normalization)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def judge_messages(prompt: str, reference: str, response: str) -> list[dict[str, str]]:
    user = f"Request:\n{prompt}\n\nReference answer:\n{reference}\n\nResponse:\n{response}\n\nVerdict:"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def verdict(reply: str) -> bool | None:
    """CORRECT -> True, INCORRECT -> False, whichever comes first in the reply; None if neither does."""
    found = _VERDICT.search(reply)
    return None if found is None else found.group(1).upper() == "CORRECT"


def chat_url(base: str) -> str:
    """The chat completions URL of an API given by its base (http://host:8000/v1) or by that URL itself."""
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def ask_judge(url: str, model: str, messages: list[dict[str, str]], api_key: str = "", timeout_s: float = 300) -> str:
    """The reply of an OpenAI-compatible chat endpoint to `messages` (greedy), as text."""
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 16}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(chat_url(url), data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ConfigError(f"the judge at {chat_url(url)} answered {e.code}: {detail[:300]}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"the judge at {chat_url(url)} cannot be reached ({reason}): check --judge-url") from None
    try:
        return payload["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ConfigError(f"the judge at {chat_url(url)} gave no chat completion: is it an OpenAI-compatible API?")


def generate_responses(
    experiment: Experiment, params: Any, tokenizer: Any, items: list[dict[str, str]], template: str | None,
    max_new_tokens: int, batch_size: int = 16,
) -> list[str]:
    """Greedy responses: prompts in an instruction-tuned run's template ("chat" or "alpaca"), else (None) as text
    to continue after an end-of-document token. Batches group prompts of similar length."""
    from jaxlm import finetune
    from jaxlm.generate import generate

    cfg = experiment.model
    prompts = []
    for item in items:
        if template == "alpaca":
            prompts.append(finetune.prompt_ids(tokenizer, finetune.alpaca_prompt(item["prompt"], item["input"])))
        elif template is not None:
            request = f"{item['prompt']}\n\n{item['input']}" if item["input"] else item["prompt"]
            prompts.append(finetune.prompt_ids(tokenizer, finetune.user_prompt(request, template)))
        else:
            text = f"{item['prompt']}\n{item['input']}" if item["input"] else item["prompt"]
            prompts.append([tokenizer.eos_id, *tokenizer.encode(text)])
    for i, ids in enumerate(prompts):
        if len(ids) >= cfg.max_seq_len:
            raise DataError(
                f"prompt {i + 1} is {len(ids)} tokens, which leaves no room in the model's context of "
                f"{cfg.max_seq_len} tokens: shorten it"
            )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in batch)
        new_tokens = min(max_new_tokens, cfg.max_seq_len - longest)
        outputs = generate(cfg, params, [prompts[i] for i in batch], max_new_tokens=new_tokens,
                           eos_id=tokenizer.eos_id, bucketed=True)
        for i, new_ids in zip(batch, outputs):
            responses[i] = tokenizer.decode(new_ids)
    return responses


def evaluate_generations(experiment: Experiment, params: Any, args: Any) -> dict:
    """tools.evaluate --generate: responses written to a JSONL file, their exact match and judge figures."""
    from jaxlm import finetune

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if bool(args.judge_url) != bool(args.judge_model):
        raise ConfigError("--judge-url and --judge-model go together: give both, or neither")
    items = read_prompts(args.generate)
    tokenizer = finetune.load_tokenizer(experiment)
    template = finetune.run_layout(args.run) if finetune.instruction_tuned(args.run) else None
    responses = generate_responses(
        experiment, params, tokenizer, items, template, args.max_new_tokens, args.batch_size or 16
    )
    api_key = args.judge_api_key or os.environ.get("OPENAI_API_KEY", "")
    rows = []
    for item, response in zip(items, responses):
        row = {"prompt": item["prompt"], "input": item["input"], "reference": item["reference"],
               "response": response, "exact_match": response.strip() == item["reference"].strip(),
               "exact_match_normalized": normalize_answer(response) == normalize_answer(item["reference"])}
        if args.judge_url:
            request = f"{item['prompt']}\n\n{item['input']}" if item["input"] else item["prompt"]
            reply = ask_judge(args.judge_url, args.judge_model, judge_messages(request, item["reference"], response),
                              api_key)
            row.update(judge_reply=reply, judge_correct=verdict(reply))
        rows.append(row)
    stem = os.path.splitext(os.path.basename(args.generate))[0]
    path = args.responses or storage.join(args.run, f"responses-{stem}.jsonl")
    storage.write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    n = len(rows)
    result: dict[str, Any] = {
        "file": args.generate, "items": n, "responses": path, "template": template or "none",
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "exact_match_normalized": sum(r["exact_match_normalized"] for r in rows) / n,
    }
    if args.judge_url:
        verdicts = [r["judge_correct"] for r in rows if r["judge_correct"] is not None]
        result.update(
            judge_url=args.judge_url, judge_model=args.judge_model, judge_verdicts=len(verdicts),
            judge_accuracy=sum(verdicts) / len(verdicts) if verdicts else None,
        )
    judged = ""
    if args.judge_url:
        accuracy = result["judge_accuracy"]
        judged = (f"  judge {args.judge_model}: " + (f"{accuracy:.4f}" if accuracy is not None else "no verdicts")
                  + f" ({len(verdicts)} of {n} replies gave a verdict)")
    print(f"{args.run}: {n} prompts  exact match {result['exact_match']:.4f}  "
          f"normalized {result['exact_match_normalized']:.4f}{judged}  -> {path}")
    return result
