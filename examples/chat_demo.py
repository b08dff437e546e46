"""Ask the exported demo model about a demo photograph through HF transformers alone (the last step of `make demo`).

    python examples/chat_demo.py runs/demo/hf [IMAGE] [QUESTION]

AutoProcessor + LlavaForConditionalGeneration + the exported chat template, as any llava-hf model is used: no file
or code from megallava is needed to run the model.
"""
import glob
import os
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def main(argv):
    model_dir = argv[0] if argv else "runs/demo/hf"
    image_path = argv[1] if len(argv) > 1 else sorted(glob.glob("runs/demo_data/images/astronaut.*"))[0]
    question = argv[2] if len(argv) > 2 else "What is in this picture?"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"{os.path.basename(image_path)}: USER: {question}\nASSISTANT: {answer}")


if __name__ == "__main__":
    main(sys.argv[1:])
