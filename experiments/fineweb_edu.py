"""FineWeb-Edu: a GPT-2 124M-sized Llama pretrained on FineWeb-Edu's 10B-token sample, declared, not yet run.

What it tests: the sharded-corpus path at one host's scale, on the corpus GPT-2-sized runs are now compared on.
A Llama-family model with GPT-2 small's shape (12 layers, width 768, 12 heads; RoPE, RMSNorm, SwiGLU, untied
embeddings; 32k BPE vocabulary trained here, about 134M parameters with the untied embeddings), sequences of 1,024
tokens in global batches of 512 (524k tokens), bfloat16, 19,000 steps: one pass over the 10B-token sample.

Cost: 8.0e18 training FLOPs (6 N per token; attention adds about a tenth): at 40% MFU about 45 minutes on an
8-GPU H100 box, 3 hours on a TPU v5p-8 host (4 chips).

Data: FineWeb-Edu's parquet files (a `text` column), local or in a bucket:
`huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset --include 'sample/10BT/*' --local-dir
fineweb-edu` (14 files, about 27 GB). FineWeb-Edu has no validation split: a stable hash of each document's text
puts 0.1% of the documents in validation. Give the folder with `--data.source 'shards:DIR/sample/10BT/*.parquet'`
(default DIR: ./fineweb-edu); `python -m tools.prepare_data --experiment fineweb_edu` prepares it once (it is also
done by the first run), then `python -m experiments.fineweb_edu`. With less memory per chip, `--train.grad-accum 2`.

Found: not run yet.
"""

from jaxlm.cli import run
from jaxlm.config import DataConfig, Experiment, MeshConfig, ModelConfig, OptimConfig, TrainConfig

EXPERIMENT = Experiment(
    name="fineweb_edu",
    model=ModelConfig(
        family="llama", n_layers=12, d_model=768, n_heads=12, vocab_size=32000, max_seq_len=1024,
        dtype="bfloat16", attention="auto", remat="none",
    ),
    data=DataConfig(
        source="shards:fineweb-edu/sample/10BT/*.parquet", val_fraction=0.001, tokenizer="sentencepiece-bpe",
        vocab_size=32000, seq_len=1024, batch_size=512, num_workers=8,
    ),
    optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=700, schedule="cosine", weight_decay=0.1, grad_clip=1.0),
    train=TrainConfig(steps=19_000, eval_every=1000, eval_steps=20, ckpt_every=1000, keep_checkpoints=2, log_every=50),
    mesh=MeshConfig(data=-1),
)


def main() -> None:
    run(EXPERIMENT)


if __name__ == "__main__":
    main()
