"""Language-only multiple-choice evaluation by likelihood (MMLU-style), batched forward-only at any TP/PP layout.

    python -m megallava.evaluate --checkpoint CKPT --questions mmlu_test.jsonl [--dev mmlu_dev.jsonl --shots 5]
    torchrun --nproc-per-node 4 -m megallava.evaluate --checkpoint CKPT --tp 2 --pp 2 --questions q.jsonl

Input: JSON lines ``{"subject": ..., "question": ..., "choices": [...], "answer": 0-based index or "A".."D"}``
(bring your own copy of MMLU or any other set). Each question becomes MMLU's prompt ("The following are multiple
choice questions (with answers) about {subject}.", optional few-shot examples of the same subject from ``--dev``,
the question and its lettered choices, "Answer:"), and each choice is scored by the log-likelihood the model gives
its continuation: ``--score letter`` (default, MMLU's: " A", " B", ...) or ``--score text`` (the choice's own text,
length-normalised: mean log-probability per token). The prediction is the best-scoring choice; accuracy is reported
per subject and overall (the last line of stdout is the overall accuracy as JSON).

Scoring runs megatron's forward-only pipeline schedule over micro-batches of (context, continuation) rows: the
same model code as training (``LLaVAChunk`` with labels on the continuation tokens only), so the log-likelihoods
are the training loss's, at any layout.
"""
import argparse
import json
import sys
from collections import defaultdict
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch

LETTERS = "ABCDEFGHIJ"


def mmlu_prompt(question: dict, shots: Sequence[dict] = ()) -> str:
    subject = question.get("subject", "").replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    return head + "".join(_block(q) + f" {LETTERS[_answer(q)]}\n\n" for q in shots) + _block(question)


def _block(q: dict) -> str:
    lines = [q["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def _answer(q: dict) -> int:
    a = q["answer"]
    return LETTERS.index(a.strip().upper()) if isinstance(a, str) else int(a)


def continuation_rows(tokenizer, context: str, continuations: Sequence[str]) -> List[Tuple[List[int], int]]:
    """(token ids, number of continuation tokens at the end) per continuation: BOS (as training) + the context and
    continuation tokenized together, the continuation's tokens being those after the context's own tokenization
    (a word's leading space belongs to the continuation, as sentencepiece and BPE attach it)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ctx = tokenizer.encode(context)
    rows = []
    for cont in continuations:
        full = tokenizer.encode(context + cont)
        if full[:len(ctx)] != ctx:  # the join changed the context's last token: score the continuation alone
            full = ctx + tokenizer.encode(cont)
        rows.append((bos + full, len(full) - len(ctx)))
    return rows


def _row_loss(labels, per_token_loss):
    mask = labels >= 0
    row = torch.stack([-(per_token_loss * mask).sum(1).double(), mask.sum(1).double()], dim=1)
    return per_token_loss.sum(), mask.sum().to(torch.int), {"rows": row}


def _forward_step(data_iterator, model):
    from megallava.model.init import unwrap

    chunk = unwrap(model)
    batch = next(data_iterator)
    device = next(chunk.parameters()).device
    tokens = batch["tokens"].to(device) if chunk.pre_process else None
    labels = batch["labels"].to(device) if chunk.post_process else None
    output = model(tokens=tokens, images=None, labels=labels)
    return output, partial(_row_loss, labels)


@torch.no_grad()
def loglikelihoods(chunks, rows: Sequence[Tuple[List[int], int]], micro_batch_size: int = 8) -> List[Tuple[float, int]]:
    """(sum of log-probabilities of the last n tokens, n) for each (ids, n) row, on every rank: megatron's
    forward-only schedule over padded micro-batches of rows (pipeline stages exchange their own shapes)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megallava.data.batching import IGNORE_INDEX

    micro = []
    for i in range(0, len(rows), micro_batch_size):
        part = rows[i:i + micro_batch_size]
        length = max(len(ids) for ids, _ in part)
        tokens = torch.zeros(len(part), length, dtype=torch.long)
        labels = torch.full((len(part), length), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, n) in enumerate(part):
            tokens[r, :len(ids)] = torch.tensor(ids)
            # labels[t] = the token at t + 1: the continuation's n tokens are predicted at positions L-n-1 .. L-2
            labels[r, len(ids) - n - 1:len(ids) - 1] = torch.tensor(ids[len(ids) - n:])
        micro.append({"tokens": tokens, "labels": labels})
    model = chunks[0]
    for c in chunks:
        c.eval()
    store = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(micro), model=model, num_microbatches=len(micro),
        seq_length=max(m["tokens"].shape[1] for m in micro), micro_batch_size=micro_batch_size, forward_only=True)
    device = next(model.parameters()).device
    out = torch.zeros(len(rows), 2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        out = torch.cat([x["rows"] for x in store]).to(device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(out, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return [(float(ll), int(n)) for ll, n in out.tolist()]


def evaluate_multiple_choice(chunks, tokenizer, questions: Sequence[dict], dev: Sequence[dict] = (), shots: int = 0,
                             score: str = "letter", micro_batch_size: int = 8) -> Dict:
    """Accuracy per subject and overall, plus each question's choice scores and prediction."""
    by_subject = defaultdict(list)
    for q in dev:
        by_subject[q.get("subject", "")].append(q)
    rows, owners = [], []
    for qi, q in enumerate(questions):
        context = mmlu_prompt(q, by_subject[q.get("subject", "")][:shots])
        conts = [f" {LETTERS[i]}" for i in range(len(q["choices"]))] if score == "letter" \
            else [f" {c}" for c in q["choices"]]
        rows += continuation_rows(tokenizer, context, conts)
        owners += [qi] * len(conts)
    scores = loglikelihoods(chunks, rows, micro_batch_size)
    per_q = defaultdict(list)
    for qi, (ll, n) in zip(owners, scores):
        per_q[qi].append(ll / n if score == "text" else ll)
    results, hits = [], defaultdict(list)
    for qi, q in enumerate(questions):
        s = per_q[qi]
        pred = max(range(len(s)), key=s.__getitem__)
        results.append({"scores": s, "prediction": pred, "answer": _answer(q)})
        hits[q.get("subject", "")].append(pred == _answer(q))
    accuracy = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / max(len(questions), 1)
    return {"accuracy": overall, "per_subject": accuracy, "n": len(questions), "questions": results}


def _read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megallava.generate import load

    p = argparse.ArgumentParser(prog="megallava.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--questions", required=True, help="JSONL: subject, question, choices, answer")
    p.add_argument("--dev", help="JSONL of few-shot examples (same fields), taken per subject")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--score", choices=["letter", "text"], default="letter")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--config")
    p.add_argument("--tokenizer")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--out", help="write the full results (per question) as JSON")
    args = p.parse_args(argv)
    model = load(args.checkpoint, args.tp, args.pp, args.config, args.tokenizer)
    res = evaluate_multiple_choice(model.chunks, model.tokenizer, _read_jsonl(args.questions),
                                   _read_jsonl(args.dev) if args.dev else (), args.shots, args.score,
                                   args.micro_batch_size)
    if torch.distributed.get_rank() == 0:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        for subject, acc in res["per_subject"].items():
            print(f"{subject or '(no subject)'}: {acc:.4f}")
        print(json.dumps({"accuracy": res["accuracy"], "n": res["n"]}), flush=True)
    from megallava.distributed import shutdown
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
