"""Synthetic multimodal conversations, deterministic per (seed, sample index) and independent of the layout.

Stands in for the webdataset loader behind the same sample interface (see batching.py). Each sample is
[bos] then 1-2 rounds of (prompt with image placeholders, answer, eos); only answers and their eos are trained.
Answers count upwards from a token that depends on the prompt, so a model can learn them and the demo loss falls.
"""
from typing import Dict

import torch

from megallava.data.batching import IGNORE_INDEX

BOS, EOS, FIRST_TEXT_ID = 1, 2, 3


class SyntheticConversations:
    def __init__(self, seed: int, vocab_size: int, seq_length: int, image_size: int, image_tokens: int,
                 image_token_id: int, text_only_fraction: float = 0.25, max_images_per_sample: int = 1):
        self.seed, self.vocab_size, self.seq_length = seed, vocab_size, seq_length
        self.image_size, self.image_tokens, self.image_token_id = image_size, image_tokens, image_token_id
        self.text_only_fraction, self.max_images = text_only_fraction, max_images_per_sample
        # A small text alphabet keeps the counting task learnable by a tiny model within a demo's iterations.
        self.text_range = min(vocab_size - FIRST_TEXT_ID, 64)

    def _text(self, gen, n):
        return torch.randint(FIRST_TEXT_ID, FIRST_TEXT_ID + self.text_range, (n,), generator=gen)

    def sample(self, index: int, with_images: bool = True) -> Dict:
        gen = torch.Generator().manual_seed(self.seed * 7_919 + index)
        n_images = 0
        if self.max_images > 0 and torch.rand((), generator=gen).item() >= self.text_only_fraction:
            n_images = int(torch.randint(1, self.max_images + 1, (), generator=gen))
        tokens = [torch.tensor([BOS])]
        trained = [torch.tensor([False])]
        for r in range(int(torch.randint(1, 3, (), generator=gen))):
            prompt = self._text(gen, int(torch.randint(3, 9, (), generator=gen)))
            start = int(prompt[-1]) - FIRST_TEXT_ID
            answer = FIRST_TEXT_ID + (start + 1 + torch.arange(int(torch.randint(3, 12, (), generator=gen)))) % self.text_range
            if r == 0:  # images open the first round, as LLaVA's "<image>\n" does
                prompt = torch.cat([torch.full((n_images * self.image_tokens,), self.image_token_id), prompt])
            answer = torch.cat([answer, torch.tensor([EOS])])
            if r > 0 and sum(t.numel() for t in tokens) + prompt.numel() + answer.numel() > self.seq_length:
                break
            tokens += [prompt, answer]
            trained += [torch.zeros(prompt.numel(), dtype=torch.bool), torch.ones(answer.numel(), dtype=torch.bool)]
        # Truncation only ever cuts the first answer: images sit before it (validate() keeps room for them).
        tokens, trained = torch.cat(tokens)[: self.seq_length], torch.cat(trained)[: self.seq_length]
        labels = torch.full_like(tokens, IGNORE_INDEX)
        labels[:-1] = torch.where(trained[1:], tokens[1:], torch.full_like(tokens[1:], IGNORE_INDEX))
        shape = (n_images, 3, self.image_size, self.image_size) if with_images else (n_images, 0)
        images = torch.randn(shape, generator=gen) if with_images else torch.zeros(shape)
        return {"tokens": tokens, "labels": labels, "images": images}
