"""Quickstart: a small Llama-style model on the Python standard library's source, in minutes on a laptop CPU.

What it tests: the whole path (corpus preparation, tokenizer training, packing, training, evaluation,
checkpoints, sampling) on the embedded `pystdlib` corpus: a 2,048-token BPE tokenizer, a 1.31M-parameter model
with RoPE, RMSNorm, SwiGLU and grouped-query attention (4 layers, d_model 128, 4 query heads sharing 2 key/value
heads), 600 steps of 32 x 128 tokens (2.46M tokens, about 0.6 epochs).

Cost: about 4 minutes on two CPU cores from a cold cache, corpus and tokenizer preparation included.

Found: see the README's results table and docs/results.md (the whole validation split's bits per byte, the
wall time from a cold cache, and the GPT-2 comparison, `experiments.quickstart_gpt2`).
"""

from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig

EXPERIMENT = Experiment(
    name="quickstart",
    model=ModelConfig(
        family="llama", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=2048, max_seq_len=256
    ),
    data=DataConfig(source="pystdlib", tokenizer="sentencepiece-bpe", vocab_size=2048, seq_len=128, batch_size=32),
    optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=50, weight_decay=0.1),
    train=TrainConfig(steps=600, eval_every=100, eval_steps=16, ckpt_every=200, log_every=10),
)


def main() -> None:
    run(EXPERIMENT)


if __name__ == "__main__":
    main()
