"""``albef-ray explain``: a Grad-CAM heat map of a text over an image, written as a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VARIANT_HELP = (
    "itm: Grad-CAM of the ITM match logit on a fusion layer's cross-attention, with one map per word "
    "(ALBEF_itm); itc: of the ITC similarity on the ViT's [CLS] self-attention (ALBEF_itc)"
)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``explain``.

    Args:
        commands: The top-level subcommands of ``albef-ray``.
    """
    explain = commands.add_parser(
        "explain", help="Grad-CAM heat map of a text over an image (PNG), as the paper's Fig. 5/6",
        description="Load a checkpoint, compute the Grad-CAM heat map of TEXT over IMAGE and write the image, "
        "the whole expression's map and (itm) one map per word as a PNG. Plain PyTorch, no Ray.",
    )
    explain.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, ...)")
    explain.add_argument("text", metavar="TEXT", help="the caption or referring expression")
    explain.add_argument(
        "--checkpoint", required=True, metavar="P",
        help="released ALBEF .pth, albef-ray state.pt, checkpoint directory or run directory (latest checkpoint)",
    )
    explain.add_argument("--out", "-o", default="heat.png", metavar="PNG", help="output file (default: heat.png)")
    explain.add_argument("--variant", choices=("itm", "itc"), default="itm", help=f"{VARIANT_HELP} (default: itm)")
    explain.add_argument(
        "--layer", type=int, metavar="N",
        help="1-based layer: of the fusion encoder for itm (default 3, the paper's), of the ViT for itc "
        "(default: the last)",
    )
    explain.add_argument(
        "--config", "-c", metavar="FILE", help="experiment YAML (default: the checkpoint's config.yaml, else defaults)"
    )
    explain.add_argument("--size", help="registered model size (default: the config's)")
    explain.add_argument("--image-res", type=int, metavar="R", help="input resolution (default: the config's)")
    explain.add_argument("--tokenizer", help="tokenizer name or directory (default: data.tokenizer)")
    explain.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    explain.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision (default: fp32)"
    )
    explain.set_defaults(func=_explain)


def _fail(message: str) -> int:
    print(f"albef-ray explain: {message}", file=sys.stderr)
    return 2


def _explain(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..data.transforms import decode_image
    from ..eval.gradcam import default_layer
    from ..eval.heatmap import save_heatmaps

    image_path = Path(args.image)
    if not image_path.is_file():
        return _fail(f"{image_path}: no such image file")
    image = decode_image(image_path.read_bytes())  # upright RGB, as training decodes
    if image is None:
        return _fail(f"{image_path}: not a decodable image")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        albef = load(args.checkpoint, size=args.size, image_res=args.image_res, device=device,
                     precision=args.precision, tokenizer=args.tokenizer, config=args.config)
    except FileNotFoundError as err:
        return _fail(str(err))
    arch = albef.model.arch
    count = arch.fusion_layers if args.variant == "itm" else arch.vision_depth
    if args.layer is not None and not 1 <= args.layer <= count:
        where = "fusion encoder" if args.variant == "itm" else "ViT"
        return _fail(f"--layer {args.layer}: the {where} has layers 1..{count}")
    index = None if args.layer is None else args.layer - 1
    cam, words = albef.explain(image, args.text, args.variant, index)
    layer = 1 + (default_layer(albef.model, args.variant) % count if index is None else index)
    if args.variant == "itm":
        score = f"ITM P(match) {albef.itm_probability(image, args.text).item():.3f}"
    else:
        score = f"ITC similarity/temp {cam.score.item():.2f}"
    title = f'"{args.text}"  |  ALBEF_{args.variant}, layer {layer}  |  {score}'
    out = save_heatmaps(args.out, image, cam.expression[0], words, title=title)
    print(f"albef-ray explain: wrote {out} ({args.variant}, layer {layer}, {score})")
    return 0
