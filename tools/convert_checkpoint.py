"""Convert checkpoints between HF and megallava, and check logit parity (library: megallava/convert/).

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output CKPT [--vision CLIP_DIR] [--dtype bf16]
    python tools/convert_checkpoint.py megatron-to-hf --input CKPT --output HF_DIR [--config RUN/config.yaml]
        [--tokenizer TOK] [--template vicuna_v1|llama_2|plain] [--image-mode pad|resize] [--source CONVERTED_ROOT]
        [--weights-only]
    python tools/convert_checkpoint.py verify --hf HF_DIR --megatron CKPT [--tp 2 --pp 2] [--pipeline-layers 2,3]
        [--vpp 2] [--dtype fp32|bf16] [--trainer-loader]

See docs/convert.md.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megallava.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
