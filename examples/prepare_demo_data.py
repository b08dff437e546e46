"""Build the embedded demo dataset and its webdataset shards (idempotent): real photographs shipped in the
scikit-image wheel, hand-written captions / conversations / language-only dialogues, a sentencepiece tokenizer.

    python examples/prepare_demo_data.py [OUT_DIR]     # default runs/demo_data, used by examples/configs/demo.yaml
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megallava.data.demo_data import build_demo_dataset  # noqa: E402
from megallava.data.shards import write_shards  # noqa: E402


def main(out_dir: str = "runs/demo_data") -> None:
    paths = build_demo_dataset(out_dir)
    for source, key in (("captions", "llava_stage1"), ("instruct", "llava_instruct"), ("sharegpt", "sharegpt")):
        write_shards([paths[key]], os.path.join(out_dir, "shards", source), source=source, image_root=out_dir,
                     max_samples_per_shard=32, log=lambda *a, **k: None)
    print(f"demo data in {out_dir}: shards/captions (stage 1, plain), shards/instruct and shards/sharegpt "
          f"(stage 2, vicuna_v1), tokenizer.model")


if __name__ == "__main__":
    main(*sys.argv[1:])
