"""Quickstart, Llama family: the quickstart's budget with RoPE, RMSNorm, SwiGLU and grouped-query attention.

Same corpus, tokenizer, batch and steps as `experiments.quickstart`; the model has the Llama layout (untied
embeddings, no biases, 4 query heads sharing 2 key/value heads) at a similar parameter count.

Cost: 3.5-4 minutes of training on two CPU cores, as the GPT-2 quickstart.

Found (2026-11-29): validation loss 4.086 nats per token (2.025 bits per byte) after 2.46M tokens,
against the GPT-2 quickstart's 4.594 on the same data and budget. Details: docs/results.md.
"""

import dataclasses

from experiments.quickstart import EXPERIMENT as GPT2_QUICKSTART
from jaxlm.cli import run
from jaxlm.config import ModelConfig

EXPERIMENT = dataclasses.replace(
    GPT2_QUICKSTART,
    name="quickstart_llama",
    model=ModelConfig(
        family="llama", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384,
        vocab_size=GPT2_QUICKSTART.model.vocab_size, max_seq_len=GPT2_QUICKSTART.model.max_seq_len,
    ),
)


def main() -> None:
    run(EXPERIMENT)


if __name__ == "__main__":
    main()
