"""Small synthetic shards in the layouts people download: allenai/c4 (json.gz) and FineWeb(-Edu) (parquet)."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np

WORDS = ("the", "model", "reads", "web", "pages", "and", "learns", "é", "日本", "🙂", "data", "of", "a", "1234", "\n")


def documents(seed: int, count: int, words: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        body = " ".join(str(w) for w in rng.choice(WORDS, int(rng.integers(words // 2, words))))
        docs.append(f"doc {seed}-{i}: {body}")
    return docs


def write_c4(root: str, train_files: int = 4, val_files: int = 2, docs_per_file: int = 60) -> dict[str, list[str]]:
    """`en/c4-train.0000i-of-01024.json.gz` and `en/c4-validation.0000i-of-00008.json.gz`, one JSON object per line
    with text, timestamp and url; returns each file's documents by path."""
    out = {}
    os.makedirs(os.path.join(root, "en"), exist_ok=True)
    for split, count, total in (("train", train_files, 1024), ("validation", val_files, 8)):
        for i in range(count):
            path = os.path.join(root, "en", f"c4-{split}.{i:05d}-of-{total:05d}.json.gz")
            docs = documents((0 if split == "train" else 500) + i, docs_per_file)
            lines = [
                json.dumps({"text": d, "timestamp": f"2019-04-{(j % 28) + 1:02d}T10:00:00Z",
                            "url": f"https://example.com/{split}/{i}/{j}"})
                for j, d in enumerate(docs)
            ]
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            out[path] = docs
    return out


def write_fineweb(root: str, files: int = 3, docs_per_file: int = 60) -> dict[str, list[str]]:
    """FineWeb-Edu's `sample/10BT/00i_00000.parquet`: a text column beside id, url, dump, score and others."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    folder = os.path.join(root, "sample", "10BT")
    os.makedirs(folder, exist_ok=True)
    for i in range(files):
        docs = documents(1000 + i, docs_per_file)
        table = pa.table({
            "text": docs,
            "id": [f"<urn:uuid:{i}-{j}>" for j in range(len(docs))],
            "dump": ["CC-MAIN-2024-10"] * len(docs),
            "url": [f"https://example.org/{i}/{j}" for j in range(len(docs))],
            "language_score": np.linspace(0.9, 1.0, len(docs)),
            "token_count": [len(d.split()) for d in docs],
            "score": np.linspace(2.5, 4.0, len(docs)),
            "int_score": [3] * len(docs),
        })
        path = os.path.join(folder, f"{i:03d}_00000.parquet")
        pq.write_table(table, path, row_group_size=25)
        out[path] = docs
    return out
