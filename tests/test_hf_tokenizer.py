"""Hugging Face tokenizers (tokenizer.json) as jaxlm tokenizers, checked against transformers'
PreTrainedTokenizerFast. A GPT-2-shaped model sampling text with such a tokenizer: tests/test_serve.py."""

import json
import os

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxlm.data.tokenizer import HFTokenizer, TokenizerSpec, build_tokenizer, load_hf_tokenizer, load_pretrained
from jaxlm.errors import DataError

transformers = pytest.importorskip("transformers")

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Le café est très bon.\n",
    "import os\nfor name in os.listdir('.'):\n\tprint(name)\n",
    "Grüße aus Köln, 東京 and Москва.  Two  spaces,\ttabs and trailing space \n",
] * 20
TEXTS = [
    "def hello(name):\n    print(f'hi {name}')\n",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\r\nwindows line ends\n\n\n",
    "unicode: naïve café, 東京タワー, Привет, emoji 🦊🚀, combining e\u0301",
    "never seen in training: ZQXJ ✓ ∑ ∞",
    "",
    " ",
]
EOT = "<|endoftext|>"


def _byte_level_bpe(vocab_size: int = 400, specials: tuple[str, ...] = (EOT,)) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory) -> str:
    """A GPT-2-style byte-level BPE tokenizer.json, trained here; nothing beside it."""
    path = tmp_path_factory.mktemp("gpt2_tok") / "tokenizer.json"
    _byte_level_bpe().save(str(path))
    return str(path)


def test_same_ids_as_transformers_and_exact_round_trips(gpt2_style):
    ours = load_pretrained(gpt2_style)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=gpt2_style)
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    # Text is text: a literal special token in a document is encoded as characters, as transformers does when
    # told not to split on special tokens, so the document comes back whole.
    literal = f"docs mention {EOT} literally"
    splitting = transformers.PreTrainedTokenizerFast(tokenizer_file=gpt2_style, split_special_tokens=True)
    assert ours.encode(literal) == splitting.encode(literal, add_special_tokens=False)
    assert ours.decode(ours.encode(literal)) == literal
    # The one special token is the end of text; GPT-2 puts nothing before a text.
    assert ours.eos_id == theirs.convert_tokens_to_ids(EOT) and ours.bos_id == -1
    assert ours.decode([ours.eos_id, *ours.encode("ab"), ours.eos_id]) == "ab"


def test_llama3_style_specials_from_the_directory(tmp_path):
    """A tokenizer whose post-processor puts <|begin_of_text|> before a text, with a tokenizer_config.json naming
    the end of text; both are read as transformers reads them."""
    bos, eos, eot = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
    tok = _byte_level_bpe(specials=(bos, eos, eot))
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eot}))
    ours = load_pretrained(str(tmp_path))  # the directory
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (bos_id, tok.token_to_id(eot))
    for text in TEXTS:
        assert [ours.bos_id, *ours.encode(text)] == theirs.encode(text), text  # encode adds nothing itself
    # Without the config file: bos from the post-processor; eos is ambiguous among three specials and none is
    # named, so it is <|end_of_text|>, the usual name.
    (tmp_path / "tokenizer_config.json").unlink()
    bare = load_pretrained(str(tmp_path / "tokenizer.json"))
    assert (bare.bos_id, bare.eos_id) == (bos_id, tok.token_to_id(eos))


def test_data_config_paths_and_clear_errors(gpt2_style, tmp_path):
    spec = lambda kind: TokenizerSpec(kind, 0, 0, "")  # noqa: E731
    by_file, _ = build_tokenizer(spec(gpt2_style), str(tmp_path / "cache"), [], [])
    by_dir, _ = build_tokenizer(spec(os.path.dirname(gpt2_style)), str(tmp_path / "cache"), [], [])
    assert by_file.encode(TEXTS[0]) == by_dir.encode(TEXTS[0]) == load_hf_tokenizer(gpt2_style).encode(TEXTS[0])
    with pytest.raises(DataError, match="without tokenizer.json"):
        load_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(DataError, match="is unknown"):
        load_pretrained("sentencepiece-bpf")
    no_eos = _byte_level_bpe(specials=("<a>", "<b>"))
    no_eos.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-sequence token"):
        load_pretrained(str(tmp_path / "tokenizer.json"))
