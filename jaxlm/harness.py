"""A jaxlm model behind EleutherAI's lm-evaluation-harness (`lm_eval.api.model.LM`), for `python -m tools.lm_eval`.

The three request kinds of the harness, each batched:

- `loglikelihood` (multiple choice, cloze): log p(continuation | context) and whether greedy decoding would
  produce the continuation, from one forward pass per request (`jaxlm.evaluate.score_continuations`, the scorer
  behind jaxlm's own multiple-choice evaluation). The context and the continuation are encoded apart, after the
  model's start tokens (a jaxlm run's end-of-document token, where every training document starts; an imported
  model's bos), as `jaxlm.evaluate` does; a context too long for the model loses its earliest tokens.
- `loglikelihood_rolling` (perplexity): log p(text) after the start tokens, in windows of the model's context
  that predict every token once (the harness's own `get_rolling_token_windows`).
- `generate_until`: KV-cache decoding (`jaxlm.generate.generate`), greedy unless the task asks for sampling,
  cut at the first of the task's stop strings.

With a mesh, the params are placed with their logical shardings over it and every batch's rows are split over its
devices; generation runs where the params are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.evaluate import score_continuations
from jaxlm.generate import generate
from jaxlm.model import Transformer
from jaxlm.train import place


def on_mesh(
    cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh, batch_size: int
) -> tuple[Any, jax.sharding.Sharding, int]:
    """The params placed over `mesh` with their logical shardings (as in training), the sharding of a batch's
    rows, and `batch_size` rounded up to a multiple of the mesh's data-parallel size."""
    def boxed():
        return Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]

    shardings = sharding.logical_shardings(jax.eval_shape(boxed), mesh)
    placed = place(params, shardings)
    parallel = sharding.data_parallel_size(mesh)
    return placed, sharding.batch_sharding(mesh), -(-batch_size // parallel) * parallel


class JaxlmLM(LM):
    """`cfg` and `params` of a language model, its `tokenizer` (encode, decode, eos_id), and `start_ids`, the
    tokens put before every context. `batch_sharding`: how a batch's rows lie on a mesh (None: one device)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Any,
        tokenizer: Any,
        start_ids: Sequence[int],
        *,
        batch_size: int = 16,
        max_gen_tokens: int = 256,
        batch_sharding: jax.sharding.Sharding | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        if not start_ids:
            raise ConfigError("the model has no start token (eos or bos) to put before a context")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.start_ids = list(start_ids)
        self.batch_size = batch_size
        self.max_gen_tokens = max_gen_tokens
        self.batch_sharding = batch_sharding

    # ------------------------------------------------------------------------------------------- scoring

    def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        logprobs, greedy, _ = score_continuations(
            self.cfg, self.params, pairs, self.batch_size, batch_sharding=self.batch_sharding
        )
        return logprobs, greedy

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self.start_ids + self.tokenizer.encode(context), self.tokenizer.encode(continuation)))
        logprobs, greedy = self._scores(pairs)
        return [(float(lp), bool(g)) for lp, g in zip(logprobs, greedy)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            ids = self.tokenizer.encode(text)
            # The first window is the start tokens then the text; later ones take their context from the text.
            prefix, first = self.start_ids[:-1], self.start_ids[-1]
            windows = get_rolling_token_windows(
                token_list=ids, prefix_token=first, max_seq_len=self.cfg.max_seq_len - len(prefix), context_len=1
            )
            for n, (context, pred) in enumerate(map(make_disjoint_window, windows)):
                pairs.append(((prefix if n == 0 else []) + context, pred))
                owners.append(i)
        logprobs, _ = self._scores(pairs) if pairs else (np.zeros(0), None)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owners, int), logprobs)
        return [float(t) for t in totals]

    # ------------------------------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_tokens))
            sampling = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sampling else 0.0
            room = self.cfg.max_seq_len - max_new
            if room < len(self.start_ids) + 1:
                raise ConfigError(
                    f"the task asks for {max_new} new tokens, which leaves no room for a prompt in the model's "
                    f"{self.cfg.max_seq_len} positions"
                )
            prompts = {}
            for i in indices:
                ids = self.start_ids + self.tokenizer.encode(requests[i].args[0])
                prompts[i] = ids[-room:] if len(ids) > room else ids
            order = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths pad little
            for b in range(0, len(order), self.batch_size):
                rows = order[b : b + self.batch_size]
                new_ids = generate(
                    self.cfg, self.params, [prompts[i] for i in rows], max_new_tokens=max_new,
                    temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0), eos_id=self.tokenizer.eos_id,
                )
                for i, ids in zip(rows, new_ids):
                    out[i] = _cut(self.tokenizer.decode(ids), until)
        return [text or "" for text in out]


def _cut(text: str, until: Sequence[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text
