"""Shape facts the converters need, without importing megatron (a conversion is a plain single process; importing
megatron costs seconds and memory). tests/test_convert.py checks they agree with megallava.model."""
import math


def vision_num_layers_built(vcfg) -> int:
    """ViT layers megallava builds: up to the selected one (= megallava.model.vision.vision_num_layers_built)."""
    return vcfg.num_layers + vcfg.select_layer + 1


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """= megallava.model.llama.padded_vocab_size: a multiple of divisible_by x lcm(tp, 8)."""
    multiple = divisible_by * math.lcm(tp, 8)
    return ((vocab_size + multiple - 1) // multiple) * multiple
