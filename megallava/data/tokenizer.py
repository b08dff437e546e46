"""Tokenizers: a sentencepiece ``.model`` (LLaMA / Vicuna) or an HF tokenizer directory, behind one small interface.

Text is always encoded as text: no BOS/EOS is added and special-token strings in the data (a literal "</s>" in a
user turn) are NOT turned into special ids, so data cannot inject control tokens. Templates insert BOS/EOS ids
themselves (see templates.py). ``encode_with_offsets`` gives each token's (char_start, char_end) in the input text,
which is what lets templates build an exact label mask.

Image token. The trainer writes ``model.image_token_id`` into the token ids itself, so any id works for training;
LLaVA's -200 is outside every vocab, which llava-hf's ``LlavaForConditionalGeneration`` cannot embed. New models
should use an in-vocab ``<image>`` token as llava-hf does: the id is the tokenizer's size (the first free id) and
the vocab grows by one. ``image_token_settings(path)`` gives the two model keys for a tokenizer, and
``add_image_token(src, dst)`` (CLI: ``python -m megallava.data.tokenizer add-image-token SRC DST``) writes a copy
of the tokenizer that holds the token (a CONTROL piece of a sentencepiece model, which text never encodes to; a
special added token of an HF tokenizer). Training does not need the copy (the id is inserted, never tokenized);
tools/convert_checkpoint.py megatron-to-hf adds the token to the exported tokenizer itself.
"""
import io
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

IMAGE_TOKEN = "<image>"

Offsets = List[Tuple[int, int]]


class Tokenizer:
    """The interface templates and loaders use. Subclasses implement the five members below."""

    def encode(self, text: str) -> List[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> Optional[int]:
        """The id of ``piece`` as one whole token of the vocabulary (e.g. "<image>"), None if it has none."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: int = 0
    vocab_size: int = 0


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        proto = self.sp.encode(text, out_type="proto")
        ids = [p.id for p in proto.pieces]
        if text.isascii():  # byte offsets are char offsets
            return ids, [(p.begin, p.end) for p in proto.pieces]
        # sentencepiece reports UTF-8 byte offsets; map them to str indices.
        byte_to_char = [0] * (len(text.encode("utf-8")) + 1)
        pos = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            for k in range(n):
                byte_to_char[pos + k] = i
            pos += n
        byte_to_char[pos] = len(text)
        offsets = [(byte_to_char[p.begin], byte_to_char[p.end]) for p in proto.pieces]
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def piece_to_id(self, piece: str) -> Optional[int]:
        found = self.sp.piece_to_id(piece)  # unknown pieces give unk's id
        return found if 0 <= found < self.sp.get_piece_size() and self.sp.id_to_piece(found) == piece else None

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    @property
    def bos_id(self):
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @property
    def eos_id(self):
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    @property
    def pad_id(self):
        for i in (self.sp.pad_id(), self.sp.unk_id()):
            if i >= 0:
                return i
        return 0

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        from transformers import AutoTokenizer
        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path, use_fast=True)
        if not getattr(self.tok, "is_fast", False):
            raise ValueError(f"{path}: need a fast HF tokenizer (char offsets), got {type(self.tok).__name__}")

    def _call(self, text: str, offsets: bool):
        # split_special_tokens: "</s>" written in the data stays text, as with sentencepiece.
        return self.tok(text, add_special_tokens=False, return_offsets_mapping=offsets, split_special_tokens=True)

    def encode(self, text: str) -> List[int]:
        return list(self._call(text, False)["input_ids"])

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        enc = self._call(text, True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def piece_to_id(self, piece: str) -> Optional[int]:
        found = self.tok.convert_tokens_to_ids(piece)  # unknown tokens give unk's id (or None)
        if not isinstance(found, int) or found == self.tok.unk_token_id:
            return None
        return found if self.tok.convert_ids_to_tokens(found) == piece else None

    def id_to_piece(self, i: int) -> str:
        return self.tok.convert_ids_to_tokens(i)

    @property
    def bos_id(self):
        return self.tok.bos_token_id

    @property
    def eos_id(self):
        return self.tok.eos_token_id

    @property
    def pad_id(self):
        for i in (self.tok.pad_token_id, self.tok.unk_token_id):
            if i is not None:
                return i
        return 0

    @property
    def vocab_size(self):
        return len(self.tok)


def load_tokenizer(path: str) -> Tokenizer:
    """A sentencepiece ``.model`` file, or a directory AutoTokenizer can load (tokenizer.json / tokenizer.model)."""
    if os.path.isfile(path):
        try:
            return SentencePieceTokenizer(path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
    if os.path.isdir(path):
        try:
            return HFTokenizer(path)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: not an HF tokenizer directory ({e})") from e
    raise ValueError(f"{path}: no such tokenizer; expected a sentencepiece .model file or an HF tokenizer directory")


def _is_sentencepiece(path: str) -> bool:
    return os.path.isfile(path)


def image_token_settings(path: str, token: str = IMAGE_TOKEN) -> Dict[str, int]:
    """``{"vocab_size": ..., "image_token_id": ...}`` for training with an in-vocab ``token`` and the tokenizer at
    ``path``: the token's id if the tokenizer already has it, else the tokenizer's size (the id
    ``add_image_token`` gives it), and a vocab just large enough to hold it."""
    tok = SentencePieceTokenizer(path) if _is_sentencepiece(path) else HFTokenizer(path)
    n, existing = tok.vocab_size, tok.piece_to_id(token)
    if existing is not None:
        return {"vocab_size": n, "image_token_id": existing}
    return {"vocab_size": n + 1, "image_token_id": n}


def image_token_problems(tok: Tokenizer, path: str, vocab_size: int, image_token_id: int) -> List[str]:
    """What is wrong with ``model.image_token_id`` / ``model.vocab_size`` for the tokenizer ``tok`` (loaded from
    ``path``), each problem with its fix (training/preflight.py reports them before any model is built).

    A negative id (original LLaVA's -200) is never a vocab row: always fine. An id >= 0 is an embedding row, so it
    must be the tokenizer's ``<image>`` (when the tokenizer holds one) or the first id after the tokenizer's last
    (where ``add_image_token`` and the HF export put it), never a text token (every occurrence of that token in the
    text would be taken for an image slot), and inside ``model.vocab_size``."""
    if image_token_id < 0:
        return []
    n, have = tok.vocab_size, tok.piece_to_id(IMAGE_TOKEN)
    want = have if have is not None else n
    fix = (f"use model.image_token_id={want} and model.vocab_size={max(vocab_size, want + 1)} (python -m "
           f"megallava.data.tokenizer image-token-settings {path}), or model.image_token_id=-200 (original LLaVA's "
           f"out-of-vocab placeholder)")
    problems = []
    if have is not None and image_token_id != have:
        text = f" (id {image_token_id} is the token {tok.id_to_piece(image_token_id)!r})" if image_token_id < n else ""
        problems.append(f"model.image_token_id={image_token_id} but data.tokenizer {path} holds {IMAGE_TOKEN} at id "
                        f"{have}{text}: image slots and the tokenizer's {IMAGE_TOKEN} would be different rows (the HF "
                        f"export refuses such a model): {fix}")
    elif have is None and image_token_id < n:
        piece = tok.id_to_piece(image_token_id)
        problems.append(f"model.image_token_id={image_token_id} is the text token {piece!r} of data.tokenizer {path}, "
                        f"not {IMAGE_TOKEN}: every {piece!r} in the text would be taken for an image slot: {fix}")
    elif have is None and image_token_id > n:
        problems.append(f"model.image_token_id={image_token_id} is not the id after data.tokenizer {path}'s last one "
                        f"({n}): the HF export adds {IMAGE_TOKEN} at id {n} and would refuse this model: {fix}")
    if image_token_id >= vocab_size:
        how = f"raise model.vocab_size to {image_token_id + 1}" if image_token_id == want else fix
        problems.append(f"model.image_token_id={image_token_id} is outside the model's vocab (model.vocab_size="
                        f"{vocab_size}: ids 0..{vocab_size - 1}), so it has no embedding row: {how}")
    return problems


def add_image_token(src: str, dst: str, token: str = IMAGE_TOKEN) -> Dict[str, object]:
    """Copy the tokenizer ``src`` (a sentencepiece ``.model`` file or an HF tokenizer directory) to ``dst`` (a file
    or a directory, like ``src``) with ``token`` added as a special token at id = the size before, as llava-hf
    does. A tokenizer that already holds the token is copied unchanged. Returns ``{"path", "vocab_size",
    "image_token_id"}``: the model.vocab_size / model.image_token_id to train with."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"add_image_token: write the copy elsewhere than {src}")
    settings = image_token_settings(src, token)
    if _is_sentencepiece(src):
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        with open(src, "rb") as f:
            proto.ParseFromString(f.read())
        if settings["image_token_id"] == len(proto.pieces):
            # CONTROL: like <s>, it has an id but no text encodes to it (data cannot inject it).
            proto.pieces.add(piece=token, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(proto.SerializeToString())
        check = SentencePieceTokenizer(dst).sp
        assert check.piece_to_id(token) == settings["image_token_id"], "sentencepiece did not keep the piece"
    else:
        from tokenizers import AddedToken

        tok = HFTokenizer(src).tok
        if settings["image_token_id"] == len(tok):
            tok.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        os.makedirs(dst, exist_ok=True)
        tok.save_pretrained(dst)
        got = HFTokenizer(dst).tok.convert_tokens_to_ids(token)
        assert got == settings["image_token_id"], f"{token} saved at id {got}"
    return {"path": dst, **settings}


def train_sentencepiece(texts: List[str], out_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Train a LLaMA-like sentencepiece model on ``texts``; returns ``out_prefix + ".model"``.

    LLaMA's settings: byte fallback (any text encodes), identity normalisation (keeps "\\n" and spacing, so offsets
    are exact), dummy prefix, digits split, <unk>=0 <s>=1 </s>=2, no pad. One thread and the model written through
    ``model_writer`` make the file bytes depend only on the texts (not on ``out_prefix``).
    """
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2)
    path = out_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _main(argv: List[str]) -> int:
    usage = ("usage: python -m megallava.data.tokenizer add-image-token SRC DST   (SRC: sentencepiece .model or HF "
             "tokenizer dir)\n       python -m megallava.data.tokenizer image-token-settings SRC")
    if len(argv) == 3 and argv[0] == "add-image-token":
        out = add_image_token(argv[1], argv[2])
        print(f"wrote {out['path']}; train with:\n  model.vocab_size: {out['vocab_size']}\n"
              f"  model.image_token_id: {out['image_token_id']}")
        return 0
    if len(argv) == 2 and argv[0] == "image-token-settings":
        out = image_token_settings(argv[1])
        print(f"model.vocab_size: {out['vocab_size']}\nmodel.image_token_id: {out['image_token_id']}")
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
