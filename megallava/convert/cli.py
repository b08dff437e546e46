"""``python tools/convert_checkpoint.py hf-to-megatron|megatron-to-hf|verify ...`` (see docs/convert.md)."""
import argparse
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert checkpoints between HF (llava-hf, original LLaVA, LLaMA + CLIP) and megallava, and "
                    "check their logit parity. megallava checkpoints are layout-free: they load at any TP/PP/VPP.")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("hf-to-megatron", help="HF directory -> megallava checkpoint root (weights only)")
    h.add_argument("--input", required=True, help="llava-hf, original-LLaVA or HF LLaMA directory (auto-detected)")
    h.add_argument("--output", required=True, help="checkpoint root to create (train with checkpoint.load=OUTPUT)")
    h.add_argument("--vision", help="HF CLIPVisionModel / CLIPModel directory (original LLaVA, LLaMA inputs)")
    h.add_argument("--projector", help="mm_projector.bin (or .safetensors) from LLaVA stage 1")
    h.add_argument("--projector-type", choices=("linear", "mlp2x_gelu"),
                   help="projector to create when the input has none (LLaMA + CLIP; default mlp2x_gelu)")
    h.add_argument("--select-layer", type=int, help="ViT feature layer for LLaMA + CLIP (default -2: penultimate)")
    h.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised projector")
    h.add_argument("--image-token", type=int,
                   help="LLaMA + CLIP inputs: default an in-vocab <image> as llava-hf has it (the tokenizer's own, "
                        "else added at the first free id; when that is the vocab size, embedding and output layer "
                        "grow by one row, the mean of the others); -200 keeps original LLaVA's out-of-vocab "
                        "placeholder and the vocab")
    h.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast the weights (default: keep the input's)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    h.add_argument("--quiet", action="store_true", help="no per-tensor progress")

    m = sub.add_parser("megatron-to-hf", help="megallava checkpoint -> HF directory")
    m.add_argument("--input", required=True, help="checkpoint root (with latest) or one iter_N directory")
    m.add_argument("--output", required=True)
    m.add_argument("--config", help="megallava config with the model section (default: INPUT/megallava_model.yaml); "
                                    "a run's config.yaml also gives the template, image mode and checkpoint.load")
    m.add_argument("--tokenizer", help="the tokenizer the model was trained with (data.tokenizer: a sentencepiece "
                                       ".model or an HF tokenizer directory); default: the checkpoint's "
                                       "iter_N/tokenizer/, else the converted root's tokenizer/")
    m.add_argument("--template", choices=("vicuna_v1", "llama_2", "plain"),
                   help="chat template to write (default: the run config's data.sources template, else vicuna_v1)")
    m.add_argument("--image-mode", choices=("pad", "resize"),
                   help="image preprocessing to write (default: the run config's data.image_mode, else pad)")
    m.add_argument("--source", help="the hf-to-megatron output this checkpoint descends from (its hf_extra/ gives "
                                    "back the ViT layers / config fields megallava does not build); default: "
                                    "found from the checkpoint's hf_source, its root, --config or checkpoint.load")
    m.add_argument("--format", default="auto", choices=("auto", "llava-hf", "llava"),
                   help="llava-hf (LlavaForConditionalGeneration) or llava (original LLaVA layout); auto picks "
                        "llava-hf unless the projector is linear or the image token is not a vocab id")
    m.add_argument("--weights-only", action="store_true",
                   help="write weights and config only: no tokenizer, processor or chat template (benchmarks, or "
                        "when you add them yourself)")
    m.add_argument("--merge-lora", action="store_true",
                   help="LoRA checkpoint: merge the adapters into the base weights (W + alpha/r B A) and write a plain "
                        "model; without it the base is written as is, plus a PEFT adapter in OUTPUT/adapter/")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast the weights (default: keep the stored)")
    m.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--quiet", action="store_true")

    v = sub.add_parser("verify", help="logit parity: HF (transformers) vs megallava (the trainer's loader)")
    v.add_argument("--hf", required=True, help="HF directory (any flavour hf-to-megatron reads)")
    v.add_argument("--megatron", required=True, help="megallava checkpoint root or iter_N directory")
    v.add_argument("--config", help="megallava model config (default: CHECKPOINT/megallava_model.yaml)")
    v.add_argument("--vision", help="CLIP directory, for original-LLaVA / LLaMA inputs")
    v.add_argument("--projector", help="mm_projector.bin, for LLaMA inputs")
    v.add_argument("--tp", type=int, default=1, help="tensor parallel size of the megallava run (forked ranks)")
    v.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the megallava run")
    v.add_argument("--vpp", type=int, help="virtual pipeline chunks per pipeline rank (interleaved schedule)")
    v.add_argument("--pipeline-layers", type=_int_list,
                   help="LLM layers per (virtual) pipeline stage, e.g. 2,3 (parallel.pipeline_layers)")
    v.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="precision of both forwards (bf16 halves the memory; default tolerance then 0.1)")
    v.add_argument("--tolerance", type=float,
                   help="max |logit diff| and |loss diff| allowed (default 1e-3 in fp32, 0.1 in bf16)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random tokens and pixels")
    v.add_argument("--trainer-loader", action="store_true",
                   help="load the megallava side with the trainer's checkpoint.load (the resume path) instead of "
                        "streaming (tensor, layer) chunks; needs more memory")
    return p


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated layer counts, e.g. 2,3") from None


def _quiet_libraries() -> None:
    """megatron / torch.distributed deprecation chatter and transformers' progress bars hide the report."""
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch)\.")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    from megallava.convert.errors import ConversionError

    log = (lambda *a, **k: None) if getattr(args, "quiet", False) else (lambda s: print(s, flush=True))
    # Per-tensor progress lines only unless --quiet; summaries always.
    summary = lambda s: print(s, flush=True)  # noqa: E731
    try:
        if args.command == "hf-to-megatron":
            from megallava.convert.hf_to_megatron import hf_to_megatron

            hf_to_megatron(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite, vision=args.vision,
                           projector=args.projector, projector_type=args.projector_type,
                           select_layer=args.select_layer, seed=args.seed, image_token=args.image_token,
                           log=_filtered(log, summary))
        elif args.command == "megatron-to-hf":
            from megallava.convert.megatron_to_hf import megatron_to_hf

            megatron_to_hf(args.input, args.output, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, fmt=args.format, overwrite=args.overwrite,
                           template=args.template, image_mode=args.image_mode, source=args.source,
                           weights_only=args.weights_only, merge_lora=args.merge_lora, log=_filtered(log, summary))
        else:
            from megallava.convert.verify import verify

            result = verify(args.hf, args.megatron, tp=args.tp, pp=args.pp, vpp=args.vpp,
                            pipeline_layers=args.pipeline_layers, dtype=args.dtype, tolerance=args.tolerance,
                            config=args.config, vision=args.vision, projector=args.projector, seed=args.seed,
                            trainer_loader=args.trainer_loader, log=summary)
            return 0 if result["ok"] else 1
    except ConversionError as err:
        print(f"convert_checkpoint.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _filtered(progress, summary):
    """Progress lines (indented) go to ``progress``, the rest to ``summary``."""
    return lambda s: (progress if s.startswith("  ") else summary)(s)
