"""Per-device memory of a train loss and its gradient compiled for a TPU topology, with the loss in chunks and
without: what the chunked cross-entropy saves where the vocabulary is large. Needs libtpu (the `tpu` extra); runs
on any machine, since the TPU compiler works without the hardware.

    python -m tools.bench.loss_memory --topology v5e:2x2 --seq-len 2048 --batch 8 --vocab 128256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.experimental import topologies

from jaxlm import sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.model import Transformer, attention_impl, loss_chunk_size


def compile_loss(cfg: ModelConfig, mesh, batch: int, seq_len: int):
    """The loss's value and gradient for abstract parameters and batch on `mesh`, compiled."""
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    shardings = sharding.logical_shardings(boxed, mesh)
    params = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
    data = {"inputs": tokens, "targets": tokens, "segment_ids": tokens}

    def loss(params, data):
        total, count = Transformer(cfg).apply(
            {"params": params}, data["inputs"], segment_ids_BT=data["segment_ids"], loss_batch=data
        )
        return total / count

    step = sharding.traced_with_activation_sharding(jax.value_and_grad(loss), mesh)
    return jax.jit(step).lower(params, data).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2", help="a jax TPU topology name, e.g. v5e:2x2, v5p:2x2x1")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=2048)
    args = parser.parse_args()
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    for chunk in ("auto", 0):
        cfg = ModelConfig(
            family="llama", n_layers=args.layers, d_model=args.d_model, n_heads=args.d_model // 128,
            n_kv_heads=args.d_model // 256, vocab_size=args.vocab, max_seq_len=args.seq_len, dtype="bfloat16",
            loss_chunk=chunk,
        )
        start = time.perf_counter()
        compiled = compile_loss(cfg, mesh, args.batch, args.seq_len)
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        with sharding.activation_sharding(mesh):
            attention, positions = attention_impl(cfg, args.seq_len), loss_chunk_size(cfg, args.seq_len)
        print(
            f"{args.topology} B {args.batch} T {args.seq_len} V {args.vocab} L {args.layers} D {args.d_model} "
            f"attention {attention} loss_chunk={chunk} ({positions or 'plain'}): "
            f"temp {memory.temp_size_in_bytes / 2**30:.2f} GiB, arguments "
            f"{memory.argument_size_in_bytes / 2**30:.2f} GiB per device; compiled in {seconds:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
