"""megallava.data.tokenizer: a sentencepiece .model and an HF tokenizer directory behind one interface."""
import pytest

from megallava.data.templates import encode_conversation
from megallava.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is in the picture? ASSISTANT: A red motorcycle parked in a garage.",
    "The cat sat on the mat.\nIt was a sunny day in 2024.",
    "Translate 'good morning' into Spanish: buenos días.",
] * 4
TRICKY = ["Hello world", "  two leading spaces", "trailing space ", "tabs\tand\nnewlines\n\n", "digits 12345",
          "unicode: días, naïve, 日本語 🙂", "a literal </s> and <s> stay text", ""]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("tok") / "demo"), vocab_size=400)


@pytest.fixture(scope="module")
def hf_dir(sp_path, tmp_path_factory):
    """An HF tokenizer directory (tokenizer.json) converted from the sentencepiece model, no hub access."""
    import shutil
    from transformers import AutoTokenizer
    src = tmp_path_factory.mktemp("spdir")
    shutil.copy(sp_path, src / "tokenizer.model")
    out = tmp_path_factory.mktemp("hf")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    assert (out / "tokenizer.json").exists()
    return str(out)


def test_sentencepiece_basics(sp_path):
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # LLaMA's ids; no pad piece -> unk
    assert tok.vocab_size == 400
    ids = tok.encode("The cat sat on the mat.")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    for text in TRICKY:  # byte fallback + identity normalisation: every text round-trips exactly
        assert tok.decode(tok.encode(text)) == text
    # special-token strings in data are text, never control ids
    assert tok.eos_id not in tok.encode("a literal </s> and <s> stay text")


def test_offsets_are_char_spans(sp_path):
    tok = load_tokenizer(sp_path)
    for text in TRICKY:
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text) and len(offsets) == len(ids)
        # non-empty spans tile the text in order (byte-fallback pieces of one char: empty spans, then the char)
        assert "".join(text[s:e] for s, e in offsets) == text
        assert all(0 <= s <= e <= len(text) for s, e in offsets)
    ids, offsets = tok.encode_with_offsets("x 日本")
    assert offsets[-1] == (3, 4)  # char offsets, not UTF-8 byte offsets (which would be (5, 8))


def test_train_is_deterministic_and_independent_of_path(tmp_path, sp_path):
    again = train_sentencepiece(CORPUS, str(tmp_path / "sub" / "other"), vocab_size=400)
    assert again.endswith("other.model")
    assert open(again, "rb").read() == open(sp_path, "rb").read()


def test_hf_directory_matches_sentencepiece(sp_path, hf_dir):
    sp, hf = load_tokenizer(sp_path), load_tokenizer(hf_dir)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (sp.bos_id, sp.eos_id, sp.vocab_size)
    for text in TRICKY:
        assert hf.encode(text) == sp.encode(text), text
        ids, offsets = hf.encode_with_offsets(text)
        assert ids == sp.encode(text) and len(offsets) == len(ids)
    assert hf.decode(sp.encode("The cat sat on the mat.")) == "The cat sat on the mat."
    # the same conversation gives the same tokens and the same mask through either backend
    conv = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red motorcycle parked in a garage."},
            {"from": "human", "value": "Is it sunny? </s>"}, {"from": "gpt", "value": "Yes, días 2024."}]
    for template in ("vicuna_v1", "llama_2", "plain"):
        a = encode_conversation(conv, template, sp, 1000, 3, 1)
        b = encode_conversation(conv, template, hf, 1000, 3, 1)
        assert (a.tokens, a.trained) == (b.tokens, b.trained), template


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="no_such.model"):
        load_tokenizer(str(tmp_path / "no_such.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        load_tokenizer(str(junk))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir: not an HF tokenizer directory"):
        load_tokenizer(str(empty))
