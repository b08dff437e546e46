"""megallava.data.templates: exact prompt strings, exact tokens and trained masks, and every TemplateError reason."""
import pytest

from megallava.data.templates import (IGNORE_INDEX, LLAMA2_SYSTEM, TEMPLATES, VICUNA_SYSTEM, Encoded, TemplateError,
                                      encode_conversation, render_prompt)
from megallava.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

IMG, K = 5000, 3  # image placeholder id (outside the vocab) and features per image

CORPUS = [VICUNA_SYSTEM, LLAMA2_SYSTEM,
          "USER: What is in the picture? ASSISTANT: A red motorcycle parked in a garage.",
          "[INST] Where is it parked? [/INST] In a garage, next to a wooden bench. </s>",
          "What colour is the cat? It is brown with dark stripes.", "Hello, can you help me? Of course."] * 3


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


MULTI = [h("<image>\nWhat is in the picture?"), g("A red motorcycle."), h("Where is it parked?"),
         g("In a garage, next to a wooden bench.")]
LATER = [h("Hello, can you help me?"), g("Of course."), h("What colour is this cat?\n<image>"),
         g("It is brown with dark stripes.")]
TEXT = [{"from": "system", "value": "Answer briefly."}, {"from": "user", "value": "What colour is the cat?"},
        {"from": "assistant", "value": "Brown."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=420))


def test_render_prompt_golden():
    v = VICUNA_SYSTEM + " "
    assert render_prompt(MULTI, "vicuna_v1") == (
        v + "USER: <image>\nWhat is in the picture? ASSISTANT: A red motorcycle.</s>"
        "USER: Where is it parked? ASSISTANT: In a garage, next to a wooden bench.</s>")
    # LLaVA moves the image tag to the front of its turn, followed by "\n"
    assert render_prompt(LATER, "vicuna_v1") == (
        v + "USER: Hello, can you help me? ASSISTANT: Of course.</s>"
        "USER: <image>\nWhat colour is this cat? ASSISTANT: It is brown with dark stripes.</s>")
    assert render_prompt(TEXT, "vicuna_v1") == "Answer briefly. USER: What colour is the cat? ASSISTANT: Brown.</s>"
    s = f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n"
    assert render_prompt(MULTI, "llama_2") == (
        s + "<image>\nWhat is in the picture? [/INST] A red motorcycle. </s>"
        "<s>[INST] Where is it parked? [/INST] In a garage, next to a wooden bench. </s>")
    assert render_prompt(LATER, "llama_2") == (
        s + "Hello, can you help me? [/INST] Of course. </s>"
        "<s>[INST] <image>\nWhat colour is this cat? [/INST] It is brown with dark stripes. </s>")
    assert render_prompt(TEXT, "llama_2") == (
        "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat colour is the cat? [/INST] Brown. </s>")
    # plain: the human text is dropped, only its image stays
    assert render_prompt([h("<image>\nDescribe it."), g("A red motorcycle.")], "plain") == "<image>A red motorcycle.\n"
    assert render_prompt(TEXT, "plain") == "Brown.\n"


def oracle(tok, chunks):
    """Expected (tokens, trained) from an independent rule: each chunk is tokenized alone; inside a chunk written as
    (prefix, answer) the trained tokens are the tail that decodes to the answer while the head decodes to the prefix.
    Specials: "BOS", "IMG", ("EOS", trained)."""
    tokens, trained = [], []
    for c in chunks:
        if c == "BOS":
            tokens.append(tok.bos_id), trained.append(False)
        elif c == "IMG":
            tokens += [IMG] * K
            trained += [False] * K
        elif c[0] == "EOS":
            tokens.append(tok.eos_id), trained.append(c[1])
        else:
            prefix, answer = c
            ids = tok.encode(prefix + answer)
            if not answer:
                cut = len(ids)
            elif not prefix:
                cut = 0
            else:
                cuts = [k for k in range(len(ids)) if tok.decode(ids[:k]) == prefix.rstrip(" ")
                        and tok.decode(ids[k:]) == answer.removeprefix(" ")]
                assert len(cuts) == 1, (prefix, answer, cuts)
                cut = cuts[0]
            tokens += ids
            trained += [False] * cut + [True] * (len(ids) - cut)
    return tokens, trained


def runs(enc):
    """Maximal runs of trained tokens."""
    out, cur = [], []
    for t, m in zip(enc.tokens, enc.trained):
        if m:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def encode(conv, template, tok, n):
    return encode_conversation(conv, template, tok, image_token_id=IMG, image_tokens=K, num_images=n)


def test_vicuna_tokens_and_mask(tok):
    v = VICUNA_SYSTEM + " "
    cases = {
        "multi": (MULTI, 1, ["BOS", (v + "USER: ", ""), "IMG",
                             ("\nWhat is in the picture? ASSISTANT:", " A red motorcycle."), ("EOS", True),
                             ("USER: Where is it parked? ASSISTANT:", " In a garage, next to a wooden bench."),
                             ("EOS", True)]),
        "later": (LATER, 1, ["BOS", (v + "USER: Hello, can you help me? ASSISTANT:", " Of course."), ("EOS", True),
                             ("USER: ", ""), "IMG", ("\nWhat colour is this cat? ASSISTANT:",
                                                     " It is brown with dark stripes."), ("EOS", True)]),
        "text": (TEXT, 0, ["BOS", ("Answer briefly. USER: What colour is the cat? ASSISTANT:", " Brown."),
                           ("EOS", True)]),
    }
    for name, (conv, n, chunks) in cases.items():
        enc = encode(conv, "vicuna_v1", tok, n)
        assert (enc.tokens, enc.trained) == oracle(tok, chunks), name
        answers = [t["value"] for t in conv if t["from"] in ("gpt", "assistant")]
        assert [tok.decode(r[:-1]) for r in runs(enc)] == answers  # exactly the answers ...
        assert all(r[-1] == tok.eos_id for r in runs(enc))  # ... each closed by the EOS id
        assert enc.tokens.count(IMG) == K * n and enc.num_images == n


def test_llama2_tokens_and_mask(tok):
    s = f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n"
    enc = encode(MULTI, "llama_2", tok, 1)
    assert (enc.tokens, enc.trained) == oracle(tok, [
        "BOS", (s, ""), "IMG", ("\nWhat is in the picture? [/INST]", " A red motorcycle. "), ("EOS", True), "BOS",
        ("[INST] Where is it parked? [/INST]", " In a garage, next to a wooden bench. "), ("EOS", True)])
    enc = encode(LATER, "llama_2", tok, 1)
    assert (enc.tokens, enc.trained) == oracle(tok, [
        "BOS", (s + "Hello, can you help me? [/INST]", " Of course. "), ("EOS", True), "BOS", ("[INST] ", ""),
        "IMG", ("\nWhat colour is this cat? [/INST]", " It is brown with dark stripes. "), ("EOS", True)])
    # the answer, the space before "</s>" and the EOS id are trained; "<s>" of the next round is not
    assert [tok.decode(r[:-1]) for r in runs(enc)] == ["Of course. ", "It is brown with dark stripes. "]
    enc = encode(TEXT, "llama_2", tok, 0)
    assert [tok.decode(r[:-1]) for r in runs(enc)] == ["Brown. "]
    assert enc.tokens[0] == tok.bos_id and enc.tokens.count(tok.bos_id) == 1


def test_plain_tokens_and_mask(tok):
    conv = [h("<image>\nDescribe the picture."), g("A red motorcycle parked in a garage.")]
    enc = encode(conv, "plain", tok, 1)
    assert (enc.tokens, enc.trained) == oracle(tok, ["BOS", "IMG", ("", "A red motorcycle parked in a garage.\n")])
    assert tok.decode([t for t, m in zip(enc.tokens, enc.trained) if m]) == "A red motorcycle parked in a garage.\n"
    # golden pieces: the caption's dummy-prefix space and the "\n" end marker are trained
    pieces = [tok.sp.id_to_piece(t) if t != IMG else "IMG" for t in enc.tokens]
    assert pieces[:4] == ["<s>", "IMG", "IMG", "IMG"] and pieces[-1] == "<0x0A>"
    assert enc.trained == [False] * 4 + [True] * (len(pieces) - 4)
    enc = encode(TEXT, "plain", tok, 0)  # language-only: just the answer and "\n"
    assert tok.decode(enc.tokens[1:]) == "Brown.\n" and all(enc.trained[1:]) and not enc.trained[0]


def test_normalisation(tok):
    same = [{"from": {"human": "user", "gpt": "assistant"}[t["from"]], "value": t["value"]} for t in MULTI]
    for t in TEMPLATES:
        assert encode(same, t, tok, 1) == encode(MULTI, t, tok, 1)
        # a leading assistant turn is dropped (as LLaVA does); consecutive same-role turns are joined with "\n"
        assert encode([g("Hi!")] + MULTI, t, tok, 1) == encode(MULTI, t, tok, 1)
    split = [h("<image>\nWhat is in"), h("the picture?"), g("A red motorcycle.")]
    assert render_prompt(split, "vicuna_v1").endswith(
        "USER: <image>\nWhat is in\nthe picture? ASSISTANT: A red motorcycle.</s>")
    # "</s>" written in the data stays text: the only EOS ids are the template's
    enc = encode([h("Say </s> please"), g("</s>")], "vicuna_v1", tok, 0)
    assert enc.tokens.count(tok.eos_id) == 1 and enc.tokens[-1] == tok.eos_id
    assert tok.decode(runs(enc)[0][:-1]) == "</s>"
    # two images in one turn: both tags kept, each expanded
    enc = encode([h("Compare <image> and <image>"), g("They differ.")], "vicuna_v1", tok, 2)
    assert enc.tokens.count(IMG) == 2 * K


def test_sharegpt_assistant_roles(tok):
    """Raw ShareGPT dumps name the assistant chatgpt, bard or bing: the same tokens and mask as gpt."""
    for role in ("chatgpt", "bard", "bing"):
        conv = [{"from": role if t["from"] == "gpt" else t["from"], "value": t["value"]} for t in MULTI]
        for t in TEMPLATES:
            enc = encode(conv, t, tok, 1)
            assert enc == encode(MULTI, t, tok, 1) and any(enc.trained)
        # ... as role/content (the other ShareGPT layout), after a system turn, joined with a gpt turn
        text = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Colour?"},
                {"role": role, "content": "Brown."}, {"from": "gpt", "value": "Striped."}]
        assert render_prompt(text, "vicuna_v1") == "Answer briefly. USER: Colour? ASSISTANT: Brown.\nStriped.</s>"
    with pytest.raises(TemplateError, match="unknown_role: turn 1 has role 'ChatGPT'"):  # exact names only
        encode([h("Hi"), {"from": "ChatGPT", "value": "Hello"}], "vicuna_v1", tok, 0)


def test_empty_answer_is_not_trained(tok):
    conv = [h("Hello, can you help me?"), g(""), h("What colour is the cat?"), g("Brown.")]
    enc = encode(conv, "vicuna_v1", tok, 0)
    assert [tok.decode(r) for r in runs(enc)] == ["Brown."]  # the empty answer's EOS is masked too
    assert enc.tokens.count(tok.eos_id) == 2


def test_shifted_labels():
    enc = Encoded(tokens=[1, 50, 51, 52, 2, 60, 61, 2], trained=[False, False, True, True, True, False, True, True],
                  num_images=0)
    assert enc.shifted_labels() == [IGNORE_INDEX, 51, 52, 2, IGNORE_INDEX, 61, 2, IGNORE_INDEX]


def test_shifted_labels_on_a_real_sample(tok):
    enc = encode(MULTI, "vicuna_v1", tok, 1)
    labels = enc.shifted_labels()
    assert len(labels) == len(enc.tokens) and labels[-1] == IGNORE_INDEX
    for t in range(len(labels) - 1):
        assert labels[t] == (enc.tokens[t + 1] if enc.trained[t + 1] else IGNORE_INDEX)
    assert sum(x != IGNORE_INDEX for x in labels) == sum(enc.trained)  # the BOS is never trained
    assert IMG not in labels


class MergingCharTokenizer(Tokenizer):
    """One token per character, except ": " which is a single token (as some BPE vocabularies have)."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 300

    def encode_with_offsets(self, text):
        ids, offsets, i = [], [], 0
        while i < len(text):
            n = 2 if text.startswith(": ", i) else 1
            ids.append(299 if n == 2 else 3 + ord(text[i]) % 290)
            offsets.append((i, i + n))
            i += n
        return ids, offsets


@pytest.mark.parametrize("conv,template,n,reason,words", [
    ([], "vicuna_v1", 0, "empty", "no turns"),
    ([{"from": "system", "value": "Be nice."}], "llama_2", 0, "empty", "no user or assistant"),
    ([h("Hello?")], "vicuna_v1", 0, "no_assistant_turn", "none of the 1 turns"),
    ([h("Hi"), {"from": "bot", "value": "Hello"}], "vicuna_v1", 0, "unknown_role", "'bot'"),
    ([h("Hi"), {"from": "system", "value": "x"}, g("Hello")], "vicuna_v1", 0, "unknown_role", "first turn"),
    ([h("<image>\nWhat is it?"), g("A cat.")], "vicuna_v1", 0, "image_count", "1 <image> tag(s) but the sample has 0"),
    ([h("What is it?"), g("A cat.")], "llama_2", 1, "image_count", "0 <image> tag(s) but the sample has 1"),
    ([h("<image> <image>"), g("Two cats.")], "plain", 1, "image_count", "2 <image>"),
    ([h("Hi"), g("   ")], "vicuna_v1", 0, "no_trained_tokens", "no token is trained"),
    ([h("<image>"), g("")], "plain", 1, "no_trained_tokens", "no token is trained"),
])
def test_template_errors(tok, conv, template, n, reason, words):
    with pytest.raises(TemplateError) as e:
        encode(conv, template, tok, n)
    assert e.value.reason == reason and words in str(e.value)


def test_template_error_pickles():
    import pickle
    e = pickle.loads(pickle.dumps(TemplateError("image_count", "2 tags, 1 image")))
    assert e.reason == "image_count" and str(e) == "image_count: 2 tags, 1 image" and isinstance(e, ValueError)


def test_mismatch_is_raised_not_masked():
    with pytest.raises(TemplateError) as e:
        encode_conversation([h("Hi"), g("Hello")], "vicuna_v1", MergingCharTokenizer(), IMG, K, 0)
    assert e.value.reason == "mismatch" and "': '" in str(e.value)
    # where no token crosses a boundary the same tokenizer works
    enc = encode_conversation([h("Hi"), g("Hello")], "plain", MergingCharTokenizer(), IMG, K, 0)
    assert sum(enc.trained) == len("Hello\n")


def test_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        encode(MULTI, "chatml", tok, 1)
