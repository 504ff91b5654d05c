"""FLOP counts from the literature: 6N, Kaplan et al. 2020 (Table 1), Hoffmann et al. 2022 (Appendix F, Table A4)."""

import pytest

from jaxlm.config import ModelConfig
from jaxlm.flops import (
    chinchilla_flops_per_sequence,
    chinchilla_flops_per_token,
    kaplan_flops_per_token,
    kaplan_params,
    six_n_flops_per_token,
)

# Table A4 of Hoffmann et al. 2022: (layers, d_model, ffw, heads, key size, published ratio to 6ND,
# parameters in millions from Table A9). S = 2048, V = 32000.
TABLE_A4 = [
    (10, 640, 2560, 10, 64, 1.03, 74),
    (20, 1024, 4096, 16, 64, 1.10, 306),
    (24, 1280, 5120, 10, 128, 1.08, 552),
    (26, 1792, 7168, 14, 128, 1.04, 1143),
    (28, 2048, 8192, 16, 128, 1.03, 1593),
    (40, 3584, 14336, 28, 128, 0.99, 6796),
]
# The same ratios with the embedding and final-logit FLOPs counted (the data README's figures).
WITH_EMBEDDINGS = [1.58, 1.32, 1.23, 1.14, 1.12, 1.03]
S, V = 2048, 32000


def chinchilla_n(layers: int, d: int, ffw: int) -> int:
    """Chinchilla's N: per layer the attention and dense weights and biases, two LayerNorms and a d^2 + 2d
    relative-position term; one d x V output matrix and a final LayerNorm."""
    weights = 4 * d * d + 2 * d * ffw
    biases = 3 * d + d + ffw + d
    norms = 2 * 2 * d
    relative_position = d * d + 2 * d
    return layers * (weights + biases + norms + relative_position) + d * V + 2 * d


def test_chinchilla_n_matches_table_a9():
    assert chinchilla_n(10, 640, 2560) == 73_825_280
    for layers, d, ffw, _, _, _, millions in TABLE_A4:
        assert abs(chinchilla_n(layers, d, ffw) / 1e6 - millions) < 1  # Table A9 rounds 552.6M down


@pytest.mark.parametrize("row", range(len(TABLE_A4)))
def test_table_a4_ratios(row):
    layers, d, ffw, heads, key, ratio, _ = TABLE_A4[row]
    shape = dict(seq_len=S, vocab_size=V, n_layers=layers, d_model=d, d_ff=ffw, n_heads=heads, key_size=key)
    six_nd = 6 * chinchilla_n(layers, d, ffw) * S
    assert round(chinchilla_flops_per_sequence(**shape, include_embeddings=False) / six_nd, 2) == ratio
    assert round(chinchilla_flops_per_sequence(**shape) / six_nd, 2) == WITH_EMBEDDINGS[row]
    # The config route gives the same count: ModelConfig expresses these shapes exactly (k = d / heads).
    cfg = ModelConfig(family="gpt2", n_layers=layers, d_model=d, n_heads=heads, d_ff=ffw, vocab_size=V, max_seq_len=S)
    assert cfg.head_dim == key
    per_token = chinchilla_flops_per_token(cfg, S, include_embeddings=False)
    assert per_token * S == pytest.approx(chinchilla_flops_per_sequence(**shape, include_embeddings=False), rel=1e-12)


def test_chinchilla_small_config_by_hand():
    # S=8, V=100, d=64, 2 layers, 4 heads of 16, ffw=256: each Appendix F term written out.
    embeddings = 2 * 8 * 100 * 64  # 102,400
    qkv = 2 * 3 * 8 * 64 * 64  # 196,608
    logits = 2 * 8 * 8 * 64  # 8,192
    softmax = 3 * 4 * 8 * 8  # 768
    reduction = 2 * 8 * 8 * 64  # 8,192
    projection = 2 * 8 * 64 * 64  # 65,536
    dense = 2 * 8 * (2 * 64 * 256)  # 524,288
    final_logits = 2 * 8 * 64 * 100  # 102,400
    forward = embeddings + 2 * (qkv + logits + softmax + reduction + projection + dense) + final_logits
    assert forward == 1_811_968
    cfg = ModelConfig(family="gpt2", n_layers=2, d_model=64, n_heads=4, d_ff=256, vocab_size=100, max_seq_len=8)
    assert chinchilla_flops_per_token(cfg, 8) == pytest.approx(3 * forward / 8, rel=1e-12)
    no_embeddings = forward - embeddings - final_logits
    assert chinchilla_flops_per_token(cfg, 8, include_embeddings=False) == pytest.approx(3 * no_embeddings / 8)


def test_chinchilla_gqa_and_swiglu_terms():
    # Llama shape: 2 of 4 heads for K and V, three MLP matrices. Only the K/V projections and the dense term change.
    cfg = ModelConfig(family="llama", n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=50)
    s = 16
    qkv = 2 * s * 64 * 16 * (4 + 2 * 2)
    attention = qkv + 2 * s * s * 64 + 3 * 4 * s * s + 2 * s * s * 64 + 2 * s * 64 * 64
    dense = 2 * s * 3 * 64 * 128
    assert chinchilla_flops_per_token(cfg, s, include_embeddings=False) == pytest.approx(3 * (attention + dense) / s)


def test_kaplan_small_config_by_hand():
    # Kaplan Table 1: N = 2 d n_layer (2 d_attn + d_ff); C_forward = 2N + 2 n_layer n_ctx d_attn.
    cfg = ModelConfig(family="gpt2", n_layers=2, d_model=128, n_heads=4, vocab_size=1000, max_seq_len=64)
    n = 2 * 128 * 2 * (2 * 128 + 512)
    assert n == 393_216 and kaplan_params(cfg) == n
    forward = 2 * n + 2 * 2 * 64 * 128
    assert kaplan_flops_per_token(cfg, 64) == 3 * forward == 2_457_600


def test_six_n_total_and_nonembedding():
    # GPT-2, tied: per block 2 LayerNorms (2d each), qkv 3d^2 + 3d, out d^2 + d, MLP 8d^2 + 5d; final LayerNorm 2d;
    # token embeddings V d and learned positions T d.
    d, layers, vocab, ctx = 32, 3, 50, 16
    cfg = ModelConfig(family="gpt2", n_layers=layers, d_model=d, n_heads=2, vocab_size=vocab, max_seq_len=ctx)
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d)
    nonembedding = layers * block + 2 * d
    total = nonembedding + vocab * d + ctx * d
    assert six_n_flops_per_token(cfg) == 6 * total
    assert six_n_flops_per_token(cfg, nonembedding=True) == 6 * nonembedding
    # Llama, untied, no biases: RMSNorm scales only, SwiGLU's three matrices, separate output matrix.
    llama = ModelConfig(family="llama", n_layers=2, d_model=d, n_heads=2, d_ff=64, vocab_size=vocab)
    block = 2 * d + 4 * d * d + 3 * d * 64
    assert six_n_flops_per_token(llama, nonembedding=True) == 6 * (2 * block + d)
    assert six_n_flops_per_token(llama) == 6 * (2 * block + d + 2 * vocab * d)


def test_qwen3_counts_by_hand():
    # Qwen3: queries and output n_heads * head_dim wide, keys and values n_kv_heads * head_dim, head_dim apart
    # from d_model; an RMSNorm scale of head_dim for q and one for k per layer; SwiGLU; tied embeddings.
    d, h, k, e, f, vocab = 32, 4, 2, 24, 48, 50
    cfg = ModelConfig(family="qwen3", n_layers=2, d_model=d, n_heads=h, n_kv_heads=k, head_dim=e, d_ff=f,
                      vocab_size=vocab)
    attention = d * h * e + 2 * d * k * e + h * e * d
    block = 2 * d + attention + 2 * e + 3 * d * f
    assert six_n_flops_per_token(cfg, nonembedding=True) == 6 * (2 * block + d)
    assert six_n_flops_per_token(cfg) == 6 * (2 * block + d + vocab * d)
    s = 16
    forward = 2 * (2 * s * d * e * (h + 2 * k) + 2 * s * s * e * h + 3 * h * s * s + 2 * s * s * e * h
                   + 2 * s * e * h * d + 2 * s * 3 * d * f)
    assert chinchilla_flops_per_token(cfg, s, include_embeddings=False) == pytest.approx(3 * forward / s)
    # Kaplan's N is the blocks' matmul weights: with head_dim apart from d_model, d_attn = n_heads * head_dim.
    assert kaplan_params(cfg) == 2 * (attention + 3 * d * f)
