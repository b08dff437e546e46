"""Conversation (LLaVA / ShareGPT JSON) -> token ids + an exact mask of the trained tokens.

Prompt strings follow LLaVA exactly (see ``render_prompt``):
  vicuna_v1  SYSTEM + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + ...
  llama_2    "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
  plain      "<image>" + caption + "\\n"  (stage 1; the human text is dropped, only its images are kept)
Token ids start with BOS (when the tokenizer has one). Trained: each assistant answer and its end marker ("</s>"
= the EOS id for vicuna_v1/llama_2, "\\n" for plain); system text, user turns and role tags are not trained.

How the mask is made exact (LLaVA instead re-tokenizes each round, and when the counts disagree it silently masks
the whole sample: issues #661, #1166):
- The template produces a list of segments: text pieces (each marked trained or not), BOS/EOS ids and images.
  "</s>" / "<s>" are never tokenized as text: they are EOS/BOS segments. Each "<image>" becomes ``image_tokens``
  copies of ``image_token_id``.
- Consecutive text pieces form one chunk, tokenized ONCE with char offsets; a token is trained iff its span lies
  inside a trained piece, and a token that straddles a trained/untrained boundary raises TemplateError("mismatch").
  Chunk boundaries (at BOS/EOS/images) are where LLaVA's own tokenization also restarts (tokenizer_image_token
  tokenizes the text between images separately), so the ids equal LLaVA's with a legacy LLaMA tokenizer.
- Tokens with an empty span (sentencepiece's dummy-prefix "▁", the leading bytes of a byte-fallback character)
  take the status of the next token in the chunk (else the previous one).
- The space between the role tag and the answer ("ASSISTANT: " / "[/INST] ") belongs to the answer: sentencepiece
  and byte-level BPE attach a word's leading space to the word ("▁The"), and LLaVA trains that token too. For
  llama_2 the space before "</s>" is part of the end marker and trained, as in LLaVA.

Normalisation, following LLaVA: roles human/user -> user, gpt/assistant -> assistant, and chatgpt/bard/bing (the
assistant in raw ShareGPT dumps) -> assistant (``shards.ROLES``, the table the shard writer checks too); a leading
"system" turn overrides the template's system text (a system turn anywhere else is an "unknown_role"); in a turn
that contains "<image>", the tags are moved to the front as "<image>\\n" (LLaVA keeps one; we keep each tag, one per
image); leading assistant turns are dropped (LLaVA drops a first turn that is not from the human); consecutive turns
of the same role are joined with "\\n". An empty (whitespace-only) answer is rendered but not trained, not even its
EOS: ShareGPT dumps contain such turns, and teaching the model to answer with nothing is a data bug. A sample with no
trained token left raises "no_trained_tokens" rather than training on an all-masked sample.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megallava.data.batching import IGNORE_INDEX
from megallava.data.shards import ROLES
from megallava.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("vicuna_v1", "llama_2", "plain")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
REASONS = ("empty", "no_assistant_turn", "unknown_role", "image_count", "mismatch", "no_trained_tokens")


class TemplateError(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message

    def __reduce__(self):  # picklable across DataLoader / multiprocessing workers
        return TemplateError, (self.reason, self.message)


@dataclass
class Encoded:
    tokens: List[int]
    trained: List[bool]
    num_images: int

    def shifted_labels(self) -> List[int]:
        """labels[t] = the target predicted at position t: tokens[t+1] if it is trained, else -100."""
        labels = [tok if tr else IGNORE_INDEX for tok, tr in zip(self.tokens[1:], self.trained[1:])]
        return labels + [IGNORE_INDEX]


# A segment is (kind, text, trained) with kind in {"text", "bos", "eos", "image"}.
Segment = Tuple[str, str, bool]


def _normalize(conversations: List[Dict]) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """-> (system override or None, [(role, value)]) with roles user/assistant, starting with a user turn."""
    if not conversations:
        raise TemplateError("empty", "the conversation has no turns")
    system, turns = None, []
    for i, turn in enumerate(conversations):
        raw = turn.get("from", turn.get("role"))
        value = str(turn.get("value", turn.get("content")) or "")
        if raw == "system" and i == 0:
            system = value
            continue
        if raw not in ROLES:
            where = "only allowed as the first turn" if raw == "system" else f"expected one of {sorted(ROLES)}"
            raise TemplateError("unknown_role", f"turn {i} has role {raw!r} ({where})")
        n = value.count(IMAGE_PLACEHOLDER)
        if n:  # LLaVA: "<image>" goes first, on its own line
            value = ((IMAGE_PLACEHOLDER + "\n") * n + value.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        role = ROLES[raw]
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + value)
        else:
            turns.append((role, value))
    while turns and turns[0][0] == "assistant":
        turns.pop(0)
    if not turns:
        raise TemplateError("empty", "the conversation has no user or assistant turns")
    if not any(role == "assistant" for role, _ in turns):
        raise TemplateError("no_assistant_turn", f"none of the {len(turns)} turns is from the assistant (gpt)")
    return system, turns


def _segments(conversations: List[Dict], template: str) -> List[Segment]:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    system, turns = _normalize(conversations)
    segs: List[Segment] = [("bos", "<s>", False)]
    if template == "plain":
        pending = 0
        for role, value in turns:
            if role == "user":
                pending += value.count(IMAGE_PLACEHOLDER)
                continue
            segs += [("image", IMAGE_PLACEHOLDER, False)] * pending
            pending = 0
            segs.append(("text", value + "\n", bool(value.strip())))
        segs += [("image", IMAGE_PLACEHOLDER, False)] * pending
    elif template == "vicuna_v1":
        segs.append(("text", (VICUNA_SYSTEM if system is None else system) + " ", False))
        for role, value in turns:
            if role == "user":
                segs.append(("text", "USER: " + value + " ", False))
            else:
                train = bool(value.strip())
                segs += [("text", "ASSISTANT:", False), ("text", " " + value, train), ("eos", "</s>", train)]
    else:  # llama_2
        system = LLAMA2_SYSTEM if system is None else system
        for i, (role, value) in enumerate(turns):
            if role == "user":
                if i == 0 and system:
                    value = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + value
                if i > 0:
                    segs.append(("bos", "<s>", False))
                segs.append(("text", f"[INST] {value} [/INST]", False))
            else:
                train = bool(value.strip())
                segs += [("text", " " + value + " ", train), ("eos", "</s>", train)]
    return segs


def render_prompt(conversations: List[Dict], template: str) -> str:
    """The exact prompt string, with "<image>" kept and "</s>"/"<s>" literal (the leading BOS is not shown)."""
    return "".join(text for _, text, _ in _segments(conversations, template)[1:])


def _chunk_mask(tokenizer: Tokenizer, text: str, spans: List[Tuple[int, int]]) -> Tuple[List[int], List[bool]]:
    """Tokenize one chunk; trained[i] iff token i lies inside one of ``spans`` (merged, sorted char ranges)."""
    ids, offsets = tokenizer.encode_with_offsets(text)
    status: List[Optional[bool]] = []
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            status.append(None)
            continue
        inside = any(a <= s and e <= b for a, b in spans)
        if not inside and any(max(a, s) < min(b, e) for a, b in spans):
            bounds = sorted({x for span in spans for x in span if s < x < e})
            raise TemplateError("mismatch", f"token {i} (id {ids[i]}, text {text[s:e]!r}) crosses the boundary of a "
                                f"trained span at char {bounds[0] if bounds else s} of chunk {text!r}; the label mask "
                                "cannot be aligned with this tokenizer")
        status.append(inside)
    nxt: Optional[bool] = None  # empty spans: the next decided token, else the previous one
    for i in reversed(range(len(status))):
        status[i] = nxt if status[i] is None else status[i]
        nxt = status[i] if status[i] is not None else nxt
    prev = False
    for i in range(len(status)):
        status[i] = prev if status[i] is None else status[i]
        prev = status[i]
    return ids, [bool(x) for x in status]


def encode_conversation(conversations: List[Dict], template: str, tokenizer: Tokenizer, image_token_id: int,
                        image_tokens: int, num_images: int) -> Encoded:
    encoded = _encode(_segments(conversations, template), tokenizer, image_token_id, image_tokens, num_images)
    if not any(encoded.trained):
        raise TemplateError("no_trained_tokens", f"no token is trained ({len(encoded.tokens)} tokens; every "
                            "assistant answer is empty)")
    return encoded


def prompt_segments(conversations: List[Dict], template: str) -> List[Segment]:
    """The segments of a generation prompt: the conversation (ending with a user turn) followed by the opening of
    the assistant's answer, exactly as training renders it up to the first token of the answer ("ASSISTANT:" for
    vicuna_v1, "[/INST]" for llama_2, the images for plain)."""
    segs = _segments(list(conversations) + [{"from": "gpt", "value": ""}], template)
    return segs[:-1] if template == "plain" else segs[:-2]  # drop the empty answer (and its end marker)


def encode_prompt(conversations: List[Dict], template: str, tokenizer: Tokenizer, image_token_id: int,
                  image_tokens: int, num_images: int) -> List[int]:
    """Token ids of a generation prompt (``prompt_segments``), with the same tokenization, BOS and image expansion
    as training: the model continues where it learned an answer starts."""
    return _encode(prompt_segments(conversations, template), tokenizer, image_token_id, image_tokens,
                   num_images).tokens


def _encode(segs: List[Segment], tokenizer: Tokenizer, image_token_id: int, image_tokens: int,
            num_images: int) -> Encoded:
    tags = sum(text.count(IMAGE_PLACEHOLDER) for kind, text, _ in segs if kind in ("text", "image"))
    if tags != num_images:
        raise TemplateError("image_count", f"the conversation has {tags} {IMAGE_PLACEHOLDER} tag(s) but the sample "
                            f"has {num_images} image(s)")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS id; templates need one to end each answer")
    tokens: List[int] = []
    trained: List[bool] = []
    chunk, spans = "", []

    def flush():
        nonlocal chunk, spans
        if chunk:
            ids, mask = _chunk_mask(tokenizer, chunk, spans)
            tokens.extend(ids)
            trained.extend(mask)
        chunk, spans = "", []

    def add_text(text: str, train: bool):
        nonlocal chunk
        if train and text:
            if spans and spans[-1][1] == len(chunk):  # adjacent trained pieces form one span
                spans[-1] = (spans[-1][0], len(chunk) + len(text))
            else:
                spans.append((len(chunk), len(chunk) + len(text)))
        chunk += text

    for kind, text, train in segs:
        if kind == "text":
            parts = text.split(IMAGE_PLACEHOLDER)
            for j, part in enumerate(parts):
                if j:
                    flush()
                    tokens.extend([image_token_id] * image_tokens)
                    trained.extend([False] * image_tokens)
                add_text(part, train)
            continue
        flush()
        if kind == "image":
            tokens.extend([image_token_id] * image_tokens)
            trained.extend([False] * image_tokens)
        elif kind == "bos":
            if tokenizer.bos_id is not None:
                tokens.append(tokenizer.bos_id)
                trained.append(False)
        else:
            tokens.append(tokenizer.eos_id)
            trained.append(train)
    flush()
    return Encoded(tokens=tokens, trained=trained, num_images=num_images)
