"""Quickstart, GPT-2 family: the quickstart's data and budget with learned positions, LayerNorm and a GELU MLP.

What it tests: the family comparison on equal terms (same corpus, tokenizer, batch, steps and optimizer as
`experiments.quickstart`), at a similar parameter count (1.09M: 4 layers, d_model 128, 4 heads, tied
embeddings).

Cost: about 4 minutes on two CPU cores, as the quickstart.

Found (2026-11-29): validation loss 4.594 nats per token (2.276 bits per byte) after 2.46M tokens, against the
Llama-family quickstart's 4.086 (2.025) on the same budget. Details: docs/results.md.
"""

import dataclasses

from experiments.quickstart import EXPERIMENT as QUICKSTART
from jaxlm.cli import run
from jaxlm.config import ModelConfig

EXPERIMENT = dataclasses.replace(
    QUICKSTART,
    name="quickstart_gpt2",
    model=ModelConfig(
        family="gpt2", n_layers=4, d_model=128, n_heads=4, vocab_size=QUICKSTART.model.vocab_size,
        max_seq_len=QUICKSTART.model.max_seq_len,
    ),
)


def main() -> None:
    run(EXPERIMENT)


if __name__ == "__main__":
    main()
