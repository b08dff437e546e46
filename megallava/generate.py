"""Generation from a megallava checkpoint at any TP/PP layout, with a KV cache, batched over requests.

    python -m megallava.generate --checkpoint CKPT --image photo.jpg --prompt "What is in the picture?"
    torchrun --nproc-per-node 4 -m megallava.generate --checkpoint CKPT --tp 2 --pp 2 --requests questions.jsonl \\
        --image-folder images/ --answers answers.jsonl

The prompt is built by the training templates (``templates.encode_prompt``: the same text, tokenization, BOS and
image expansion as training, ending where an answer starts) and images by the training preprocessing, so the model
sees at inference exactly what it was trained on. The model config and tokenizer come from ``--config`` /
``--tokenizer``, else from the checkpoint (a converted checkpoint's ``megallava_model.yaml``; a trainer checkpoint's
``config.yaml`` / ``tokenizer/``), else from the run's ``config.yaml`` next to the checkpoint directory.

How a batch is generated: prompts are left-padded to a common length, each request's RoPE positions start at 0
at its first real token, and padding keys are masked out. The prompt runs once (prefill) and fills megatron's
static KV cache; each new token then costs one position's forward (``use_cache=False`` recomputes the whole
sequence every step: the reference the cache is tested against). Under pipeline parallelism each step's hidden
states travel stage to stage (point-to-point) and the chosen tokens are broadcast back from the last stage.
Greedy (temperature 0) or sampling (temperature, top-p, seeded: the same answers at any layout), stopping at EOS
or after ``max_new_tokens``.

Answer files follow LLaVA's ``model_vqa.py`` (question file: one JSON per line with ``question_id``, ``image``,
``text``; answer file: ``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), so
LLaVA-Bench and MM-Vet scripts read them unchanged. The last line of stdout is the answer of the last request.
"""
import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

IMAGE_TAG = "<image>"


@dataclass
class Request:
    """One question: ``text`` (a user turn; one "<image>" tag per image is put in front when the text has none),
    or a whole ``conversation`` in LLaVA's format ending with a user turn; image file paths."""
    text: str = ""
    images: Sequence[str] = ()
    conversation: Optional[List[dict]] = None
    question_id: Optional[object] = None
    metadata: dict = field(default_factory=dict)

    def turns(self) -> List[dict]:
        if self.conversation is not None:
            return self.conversation
        text = self.text
        if self.images and IMAGE_TAG not in text:
            text = (IMAGE_TAG + "\n") * len(self.images) + text
        return [{"from": "human", "value": text}]


class Generator:
    """A loaded model chunk (this rank's pipeline stage) plus what turns requests into its inputs."""

    def __init__(self, cfg, chunks, tokenizer, template: str):
        from megallava import config as C

        self.cfg, self.chunks, self.chunk, self.tokenizer, self.template = cfg, chunks, chunks[0], tokenizer, template
        self.image_tokens = C.image_tokens_per_image(cfg)
        self.device = next(self.chunk.parameters()).device
        self.dtype = next(self.chunk.decoder.parameters()).dtype
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS id: generation could not stop")

    def encode(self, request: Request):
        """(prompt ids, images [n, 3, H, W] or None), exactly as training builds them."""
        from megallava.data.images import load_image
        from megallava.data.templates import encode_prompt

        ids = encode_prompt(request.turns(), self.template, self.tokenizer, self.cfg.model.image_token_id,
                            self.image_tokens, len(request.images))
        images = None
        if request.images:
            size, mode = self.cfg.model.vision.image_size, self.cfg.data.image_mode
            images = torch.stack([load_image(_read(path), size, mode) for path in request.images])
        return ids, images

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> List[List[int]]:
        """The generated token ids of each request (EOS not included), on every rank."""
        from megatron.core import parallel_state
        from megatron.core.inference.contexts import StaticInferenceContext
        from megallava.model.llama import rotary_freqs

        encoded = [self.encode(r) for r in requests]
        b = len(encoded)
        lengths = [len(ids) for ids, _ in encoded]
        prompt_len = max(lengths)
        total = prompt_len + max_new_tokens
        tokens = torch.zeros(b, total, dtype=torch.long, device=self.device)
        valid = torch.zeros(b, total, dtype=torch.bool, device=self.device)
        for i, (ids, _) in enumerate(encoded):  # left padding: every prompt ends at prompt_len - 1
            tokens[i, prompt_len - len(ids):prompt_len] = torch.tensor(ids, device=self.device)
            valid[i, prompt_len - len(ids):prompt_len] = True
        valid[:, prompt_len:] = True
        images = [im for _, im in encoded if im is not None]
        images = torch.cat(images).to(self.device) if images else None
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        table = rotary_freqs(total, self.cfg.model.hidden_size // self.cfg.model.num_attention_heads,
                             self.cfg.model.rope_theta, device=self.device)[:, 0, 0]  # [total, d]
        rope = table[positions.t()].unsqueeze(2)  # [total, b, 1, d]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        out: List[List[int]] = [[] for _ in range(b)]
        context = StaticInferenceContext(b, total) if use_cache else None
        start = 0  # first position of this step's inputs
        for step in range(max_new_tokens):
            end = prompt_len + step
            if not use_cache:
                start = 0
            mask = self._mask(valid, start, end)
            step_images = images if start == 0 else None
            logits = self._forward(tokens[:, start:end], step_images, rope[:end], mask, context, end - start)
            if context is not None:
                context.sequence_len_offset = end
            if parallel_state.is_pipeline_last_stage():
                nxt = _pick(logits, temperature, top_p, gen)
            else:
                nxt = torch.empty(b, dtype=torch.long, device=self.device)
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.broadcast(nxt, parallel_state.get_pipeline_model_parallel_last_rank(),
                                            group=parallel_state.get_pipeline_model_parallel_group())
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)
            for i in torch.nonzero(~done).flatten().tolist():
                if int(nxt[i]) != self.tokenizer.eos_id:
                    out[i].append(int(nxt[i]))
            done |= nxt == self.tokenizer.eos_id
            tokens[:, end] = nxt
            start = end
            if bool(done.all()):
                break
        return out

    def _mask(self, valid, start: int, end: int) -> torch.Tensor:
        """[b, 1, end - start, end], True = masked out: keys that are padding or in the future. A padding query
        attends to itself, so its (unused) output stays finite and cannot poison later steps through 0 x NaN."""
        q = torch.arange(start, end, device=valid.device)[:, None]
        k = torch.arange(end, device=valid.device)[None, :]
        allowed = (k <= q)[None] & valid[:, None, :end]
        allowed |= (k == q)[None]
        return ~allowed[:, None]

    def _forward(self, tokens, images, rope, mask, context, steps: int):
        """This stage's part of one step; returns the last position's logits on the last stage (None elsewhere)."""
        from megatron.core import parallel_state

        chunk = self.chunk
        if not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty(steps, tokens.shape[0], self.cfg.model.hidden_size, dtype=self.dtype,
                                 device=self.device)
            torch.distributed.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
        out = chunk.forward_inference(tokens if chunk.pre_process else None, images, rope, mask, context)
        if not parallel_state.is_pipeline_last_stage():
            torch.distributed.send(out.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)).strip()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0; else nucleus sampling (the smallest set of tokens whose probability reaches top_p),
    drawn from ``gen`` on the CPU so every TP rank draws the same tokens."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------ loading
def find_config(checkpoint: str) -> Optional[str]:
    """The model config that goes with a checkpoint: in the checkpoint (or its iteration directory), or the run's
    config.yaml beside the checkpoint directory."""
    from megallava.training.checkpoint import resolve

    iter_dir = resolve(checkpoint)
    for path in (os.path.join(iter_dir, "config.yaml"), os.path.join(checkpoint, "megallava_model.yaml"),
                 os.path.join(os.path.dirname(iter_dir), "megallava_model.yaml"),
                 os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")):
        if os.path.isfile(path):
            return path
    return None


def find_tokenizer(checkpoint: str, cfg) -> Optional[str]:
    from megallava.training.checkpoint import resolve

    iter_dir = resolve(checkpoint)
    for path in (os.path.join(iter_dir, "tokenizer"), os.path.join(checkpoint, "tokenizer")):
        if os.path.isdir(path):
            files = os.listdir(path)
            model = [f for f in files if f.endswith(".model")]
            return os.path.join(path, model[0]) if model and len(files) == 1 else path
    return cfg.data.tokenizer


def load(checkpoint: str, tp: int = 1, pp: int = 1, config: Optional[str] = None, tokenizer: Optional[str] = None,
         template: Optional[str] = None, overrides: Sequence[str] = (), env=None) -> Generator:
    """Initialise the process group (tp x pp ranks), build this rank's stage at that layout and load the weights."""
    from megallava import config as C
    from megallava.data.tokenizer import load_tokenizer
    from megallava.distributed import init_distributed
    from megallava.model.build import build_chunks
    from megallava.training import checkpoint as ckpt

    config = config or find_config(checkpoint)
    if config is None:
        raise SystemExit(f"no model config found for {checkpoint}: pass --config (the run's config.yaml, or the "
                         f"converted checkpoint's megallava_model.yaml)")
    cfg = C.load_config(config, [f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.vpp=null",
                                 "parallel.pipeline_layers=null", "parallel.sequence_parallel=false",
                                 "train.recompute=none", "checkpoint.load=null", "checkpoint.dir=null",
                                 *overrides])
    tok_path = tokenizer or find_tokenizer(checkpoint, cfg)
    if tok_path is None:
        raise SystemExit(f"no tokenizer for {checkpoint}: pass --tokenizer")
    env = init_distributed(tp, pp, None, cfg.train.seed, env)
    if torch.distributed.get_world_size() != tp * pp:
        raise SystemExit(f"generation runs on exactly tp x pp = {tp * pp} ranks, not "
                         f"{torch.distributed.get_world_size()}")
    chunks = build_chunks(cfg)
    ckpt.load(checkpoint, chunks, None, None, load_optimizer=False)
    for c in chunks:
        c.eval()
    template = template or (cfg.data.sources[0].template if cfg.data.sources else "vicuna_v1")
    return Generator(cfg, chunks, load_tokenizer(tok_path), template)


# ------------------------------------------------------------------------------------------------ files
def read_questions(path: str, image_folder: Optional[str] = None) -> List[Request]:
    """LLaVA's question file: one JSON per line with question_id, image (optional, relative to image_folder), text."""
    requests = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: line {n} is not JSON ({e.msg} at column {e.colno})")
            image = q.get("image")
            images = [os.path.join(image_folder or "", image)] if image else []
            requests.append(Request(text=q.get("text", q.get("prompt", "")), images=images,
                                    question_id=q.get("question_id", n - 1),
                                    metadata={k: v for k, v in q.items() if k not in ("text", "image")}))
    return requests


def answer_record(request: Request, answer: str, model_id: str) -> dict:
    """LLaVA's answer-file record (llava/eval/model_vqa.py): field names and types as LLaVA writes them."""
    return {"question_id": request.question_id, "prompt": request.text, "text": answer,
            "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megallava.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (uses its latest) or one iter_N directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--config", help="model config (default: found with the checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer (default: the checkpoint's, else the config's data.tokenizer)")
    p.add_argument("--template", help="conversation template (default: the config's first data source's)")
    p.add_argument("--prompt", help="one question")
    p.add_argument("--image", action="append", default=[], help="image file for --prompt (repeatable)")
    p.add_argument("--requests", help="LLaVA question file (JSONL: question_id, image, text)")
    p.add_argument("--image-folder", help="folder the question file's image paths are relative to")
    p.add_argument("--answers", help="write LLaVA's answer file (JSONL) here")
    p.add_argument("--model-id", default=None, help="model_id in the answer file (default: checkpoint name)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.vision.image_size=336")
    args = p.parse_args(argv)
    if bool(args.prompt) == bool(args.requests):
        p.error("give exactly one of --prompt or --requests")
    requests = ([Request(text=args.prompt, images=args.image, question_id=0)] if args.prompt
                else read_questions(args.requests, args.image_folder))
    generator = load(args.checkpoint, args.tp, args.pp, args.config, args.tokenizer, args.template, args.overrides)
    rank0 = torch.distributed.get_rank() == 0
    model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
    answers = []
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i:i + args.batch_size]
        ids = generator.generate(batch, args.max_new_tokens, args.temperature, args.top_p, args.seed)
        answers += [generator.decode(x) for x in ids]
    if rank0:
        if args.answers:
            os.makedirs(os.path.dirname(os.path.abspath(args.answers)), exist_ok=True)
            with open(args.answers, "w") as f:
                for request, answer in zip(requests, answers):
                    f.write(json.dumps(answer_record(request, answer, model_id)) + "\n")
        for request, answer in zip(requests, answers):
            print(answer if len(requests) == 1 else json.dumps({"question_id": request.question_id, "text": answer}),
                  flush=True)
    from megallava.distributed import shutdown
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
