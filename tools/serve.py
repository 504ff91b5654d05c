"""Serve a jaxlm model over HTTP with the OpenAI API: any OpenAI client, chat UI or lm_eval's
`local-completions` / `local-chat-completions` can use it.

    python -m tools.serve --run runs/quickstart --port 8000
    python -m tools.serve --hf path/to/gpt2 --host 0.0.0.0 --port 8000

Endpoints: `GET /v1/models`, `POST /v1/completions` (prompt: a string or a list of strings; max_tokens,
temperature, top_p, top_k, n, stop, and vLLM's ignore_eos), `POST /v1/chat/completions` (messages with roles
system, user and assistant, rendered by jaxlm's chat template, the one `experiments.finetune_instruct` trains;
max_tokens or max_completion_tokens and the same options). Generation runs on the KV cache (jaxlm.generate), on
one thread: requests that arrive while a batch is generating, or within --batch-wait-ms of each other, are
generated together, one batch per sampling setting, up to --max-batch rows, with shapes rounded up to powers of
two so that a few programs serve every request size. `"stream": true` is answered in the streaming format, with
the whole completion in one chunk once it is generated. Token log-probabilities are not served. A bad request is
answered with status 400 and an OpenAI-style error object; `GET /health` counts the batches generated.

--run takes a run directory, a checkpoint step directory or an instruction-tuned run (LoRA adapters folded in);
a completion's prompt follows an end-of-document token, as in training. --hf takes a Hugging Face directory with
its tokenizer (tokenizer.json or tokenizer.model); a prompt follows its bos token where it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jaxlm.errors import ConfigError, JaxlmError

USAGE_ERROR = 2


class RequestError(Exception):
    """A request the server cannot answer: status 400 with this message."""


@dataclass
class Served:
    """The model behind the server and how text becomes its token ids."""

    name: str
    cfg: Any
    params: Any
    tokenizer: Any
    start_ids: list[int]  # before a completion's prompt
    eos_id: int
    layout: str  # the chat template's layout: "chat" or (an Alpaca-tuned run) "alpaca"

    def completion_ids(self, prompt: str) -> list[int]:
        return self.start_ids + list(self.tokenizer.encode(prompt))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from jaxlm import finetune

        if self.layout == "alpaca":
            request = "\n\n".join(m["content"] for m in messages if m["role"] != "assistant")
            return finetune.prompt_ids(self.tokenizer, finetune.alpaca_prompt(request))
        return finetune.chat_prompt_ids(self.tokenizer, messages)

    def continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The text of the new tokens. Decoded after the prompt, as a tokenizer that drops a word's leading space
        at the start of a text (sentencepiece) would lose it decoded alone."""
        before = self.tokenizer.decode(prompt_ids)
        whole = self.tokenizer.decode(prompt_ids + new_ids)
        return whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(new_ids)


def load_served(run: str = "", hf: str = "", name: str = "") -> Served:
    """The model of a jaxlm run (any kind tools.evaluate takes) or of a Hugging Face directory with a tokenizer."""
    from jaxlm import finetune, storage

    if run:
        experiment, params = finetune.load_lm(run)
        tokenizer = finetune.load_tokenizer(experiment)
        layout = finetune.run_layout(run) if finetune.instruction_tuned(run) else "chat"
        label = name or storage.basename(storage.abspath(run).rstrip("/"))
        return Served(label, experiment.model, params, tokenizer, [tokenizer.eos_id], tokenizer.eos_id, layout)
    from tools.sample import TokenIds, load_hf_dir

    model = load_hf_dir(hf)
    if isinstance(model.tokenizer, TokenIds) or model.eos_id is None:
        raise ConfigError(f"{hf} has no tokenizer.json or tokenizer.model: the server needs the model's tokenizer")
    label = name or os.path.basename(os.path.abspath(hf).rstrip("/"))
    return Served(label, model.cfg, model.params, model.tokenizer, model.start_ids, model.eos_id, "chat")


# ------------------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple[float, int, float, bool]  # temperature, top_k, top_p, ignore_eos
    done: threading.Event = field(default_factory=threading.Event)
    new_ids: list[int] | None = None
    error: Exception | None = None


class Batcher:
    """One thread that runs every generation: it takes the jobs waiting in the queue and generates them together,
    one batch per sampling setting. Concurrent HTTP handlers only wait on their jobs."""

    def __init__(self, served: Served, max_batch: int, wait_s: float, seed: int = 0):
        self.served, self.max_batch, self.wait_s, self.seed = served, max_batch, wait_s, seed
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # generate calls, and the rows they carried: served on /v1/models for monitoring
        self.rows = 0
        self.thread = threading.Thread(target=self._loop, name="jaxlm-generate", daemon=True)
        self.thread.start()

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.jobs.put(job)
        for job in jobs:
            job.done.wait()
            if job.error is not None:
                raise job.error

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _take(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        taken = [first]
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return taken
            if job is None:
                self.jobs.put(None)  # close after this batch
                return taken
            taken.append(job)

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            groups: dict[tuple[float, int, float, bool], list[Job]] = {}
            for job in taken:
                groups.setdefault(job.sampling, []).append(job)
            for sampling, jobs in groups.items():
                for start in range(0, len(jobs), self.max_batch):
                    self._generate(sampling, jobs[start:start + self.max_batch])

    def _generate(self, sampling: tuple[float, int, float, bool], jobs: list[Job]) -> None:
        from jaxlm.generate import generate

        temperature, top_k, top_p, ignore_eos = sampling
        try:
            outputs = generate(
                self.served.cfg, self.served.params, [job.prompt_ids for job in jobs],
                max_new_tokens=max(job.max_tokens for job in jobs), temperature=temperature, top_k=top_k,
                top_p=top_p, seed=self.seed + self.batches, eos_id=None if ignore_eos else self.served.eos_id,
                bucketed=True,
            )
            self.batches += 1
            self.rows += len(jobs)
            for job, new_ids in zip(jobs, outputs):
                job.new_ids = new_ids[: job.max_tokens]
        except Exception as e:  # noqa: BLE001 (each waiting request gets the error, the server goes on)
            for job in jobs:
                job.error = e
        for job in jobs:
            job.done.set()


# ------------------------------------------------------------------------------------------ the OpenAI API


def _number(body: dict, key: str, kind: type, default: Any, low: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"{key} must be a number, got {value!r}")
    if low is not None and value < low:
        raise RequestError(f"{key} must be at least {low}, got {value}")
    return kind(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings")
    return [s for s in stops if s]


def _message_text(content: Any) -> str:
    """A message's content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    raise RequestError("a message's content must be a string or a list of {type: text, text} parts")


class API:
    """The OpenAI endpoints on a Served model and its Batcher."""

    def __init__(self, served: Served, batcher: Batcher):
        self.served, self.batcher = served, batcher
        self.created = int(time.time())

    def models(self) -> dict:
        card = {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "jaxlm",
                "max_model_len": self.served.cfg.max_seq_len}
        return {"object": "list", "data": [card]}

    def _sampling(self, body: dict) -> tuple[float, int, float, bool]:
        temperature = _number(body, "temperature", float, 1.0, low=0.0)
        top_p = _number(body, "top_p", float, 1.0)
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}")
        return temperature, _number(body, "top_k", int, 0, low=0), top_p, bool(body.get("ignore_eos"))

    def _complete(self, body: dict, prompts: list[list[int]], default_tokens: int) -> list[tuple[str, int, str]]:
        """(text, new tokens, finish reason) of each of the n completions of each prompt."""
        if body.get("logprobs") or body.get("echo"):
            raise RequestError("logprobs and echo are not served: ask for text only")
        n = _number(body, "n", int, 1, low=1)
        sampling = self._sampling(body)
        stops = _stops(body)
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": requested}, "max_tokens", int, None, low=1)
        context = self.served.cfg.max_seq_len
        jobs = []
        for ids in prompts:
            room = context - len(ids)
            if room < 1:
                raise RequestError(
                    f"the prompt is {len(ids)} tokens, which leaves no room in the model's context of {context} "
                    "tokens: shorten it"
                )
            if max_tokens is not None and max_tokens > room:
                raise RequestError(
                    f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}, beyond the model's context "
                    f"of {context} tokens: ask for at most {room}"
                )
            tokens = max_tokens or min(default_tokens, room)
            jobs += [Job(ids, tokens, sampling) for _ in range(n)]
        self.batcher.run(jobs)
        results = []
        for job in jobs:
            new_ids = job.new_ids or []
            ended = bool(new_ids) and new_ids[-1] == self.served.eos_id and not job.sampling[3]
            text = self.served.continuation(job.prompt_ids, new_ids)
            cut = min((text.index(s) for s in stops if s in text), default=None)
            if cut is not None:
                text, ended = text[:cut], True
            results.append((text, len(new_ids), "stop" if ended else "length"))
        return results

    @staticmethod
    def _usage(prompts: list[list[int]], results: list[tuple[str, int, str]]) -> dict:
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(tokens for _, tokens, _ in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a string or a non-empty list of strings")
        ids = [self.served.completion_ids(p) for p in prompts]
        results = self._complete(body, ids, default_tokens=16)
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, _, reason) in enumerate(results)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.served.name, "choices": choices, "usage": self._usage(ids, results),
        }

    def chat_completions(self, body: dict) -> dict:
        from jaxlm.finetune import ROLES

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages must be a non-empty list of {role, content} objects")
        turns = []
        for m in messages:
            if m.get("role") not in ROLES:
                raise RequestError(f"a message's role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
            turns.append({"role": m["role"], "content": _message_text(m.get("content"))})
        ids = [self.served.chat_ids(turns)]
        results = self._complete(body, ids, default_tokens=256)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            for i, (text, _, reason) in enumerate(results)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.served.name, "choices": choices, "usage": self._usage(ids, results),
        }


def _as_chunks(response: dict) -> list[dict]:
    """A finished response in the streaming format: each choice's text in one chunk, then its finish reason."""
    chat = response["object"] == "chat.completion"
    kind = "chat.completion.chunk" if chat else "text_completion"
    chunks = []
    for choice in response["choices"]:
        i, reason = choice["index"], choice["finish_reason"]
        if chat:
            text = {"index": i, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                    "finish_reason": None}
            end = {"index": i, "delta": {}, "finish_reason": reason}
        else:
            text = {"index": i, "text": choice["text"], "logprobs": None, "finish_reason": None}
            end = {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
        chunks += [text, end]
    head = {k: response[k] for k in ("id", "created", "model")}
    return [{**head, "object": kind, "choices": [c]} for c in chunks]


def make_handler(api: API, quiet: bool = False) -> type[BaseHTTPRequestHandler]:
    routes = {"/v1/completions": api.completions, "/v1/chat/completions": api.chat_completions}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                self._send(HTTPStatus.OK, api.models())
            elif path == "/health":
                self._send(HTTPStatus.OK, {"status": "ok", "batches": api.batcher.batches, "rows": api.batcher.rows})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}")

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            route = routes.get(path if path.startswith("/v1/") else "/v1" + path)
            try:
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size) or b"null")
            except (ValueError, UnicodeDecodeError):
                self._error(HTTPStatus.BAD_REQUEST, "the request body is not JSON")
                return
            if route is None:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
                return
            if not isinstance(body, dict):
                self._error(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
                return
            try:
                response = route(body)
            except (RequestError, JaxlmError) as e:
                self._error(HTTPStatus.BAD_REQUEST, str(e))
                return
            except Exception as e:  # noqa: BLE001 (one request's failure is that request's answer)
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}", "server_error")
                return
            if body.get("stream"):
                self._stream(response)
            else:
                self._send(HTTPStatus.OK, response)

        def _stream(self, response: dict) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in _as_chunks(response):
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode("utf-8"))
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a jaxlm run directory, one of its checkpoints/<step>, or a finetuned run")
    source.add_argument("--hf", help="a Hugging Face model directory with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--model-name", default="", help="the model's id in the API (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests generated together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sampled batch (then one more per batch)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    args = p.parse_args(argv)
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        served = load_served(args.run or "", args.hf or "", args.model_name)
        try:
            server = ThreadingHTTPServer((args.host, args.port), None)
        except OSError as e:
            raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): choose another --port")
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    batcher = Batcher(served, args.max_batch, args.batch_wait_ms / 1000, args.seed)
    server.RequestHandlerClass = make_handler(API(served, batcher), args.quiet)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"serving {served.name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        batcher.close()


if __name__ == "__main__":
    main()
