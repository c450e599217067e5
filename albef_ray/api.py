"""A ready-to-use ALBEF: load a checkpoint, then features, scores and heat maps of images and texts.

    import albef_ray
    from PIL import Image

    albef = albef_ray.load("runs/pretrain/checkpoint_000003", device="cuda", precision="bf16")
    images = [Image.open("dog.jpg")]
    albef.image_features(images)                      # (1, 256) L2-normalised ITC features
    albef.itm_probability(images, ["a dog on grass"]) # (1,) P(match) of the ITM head
    cam = albef.explain(images[0], "a dog on grass")  # Grad-CAM (ALBEF_itm), per word too

Plain PyTorch, no Ray. The model is built and loaded as ``albef-ray eval`` does
(:func:`albef_ray.eval.checkpoint.load_eval_model`), images go through the evaluation transform
of training (:mod:`albef_ray.data.transforms`: bicubic resize to R x R, CLIP normalisation),
captions through ``pre_caption`` and the official ``[CLS] caption`` tokenisation
(:func:`albef_ray.data.collate.tokenize`), and every score is the training path's
(``ALBEF.encode_image`` / ``encode_text`` / ``fuse`` / ``itm_logits``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .config import AlbefConfig, build_config, load_config, with_overrides
from .data.collate import load_tokenizer, tokenize
from .data.transforms import eval_transform, normalize, pre_caption
from .eval.checkpoint import load_eval_model, resolve_checkpoint
from .eval.gradcam import GradCam, default_layer, itc_gradcam, itm_gradcam, word_maps
from .model.albef import ALBEF
from .precision import autocast_context
from .train.checkpoint import CONFIG_FILE

log = logging.getLogger(__name__)

ImageInput = Image.Image | str | os.PathLike | bytes
PathLike = str | os.PathLike


class AlbefModel:
    """An ALBEF in eval mode with its preprocessing; all methods take PIL images and strings.

    Image inputs may also be file paths or encoded bytes (decoded as training decodes them,
    EXIF orientation applied). Outputs are float32 on :attr:`device`. Paired methods accept one
    image for many texts (it is encoded once and shared).

    Attributes:
        model: the :class:`~albef_ray.model.albef.ALBEF` (eval mode).
        tokenizer: the Hugging Face tokenizer of ``cfg.data.tokenizer`` (or the one passed in).
        cfg: the config the model was built from (size, caption length, temperature bounds).
        device: where the model runs; precision: ``"fp32"`` or ``"bf16"`` (autocast).
    """

    def __init__(self, model: ALBEF, tokenizer, cfg: AlbefConfig, device: torch.device, precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: expected 'fp32' or 'bf16'")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.precision = precision

    @property
    def image_res(self) -> int:
        return self.model.arch.image_res

    # -- preprocessing ------------------------------------------------------------------------
    def preprocess_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> (B, 3, R, R) float32 on :attr:`device`, the evaluation transform of training."""
        items = [images] if isinstance(images, (Image.Image, str, os.PathLike, bytes)) else list(images)
        return torch.stack([self._image_tensor(item) for item in items]).to(self.device)

    def _image_tensor(self, item: ImageInput) -> torch.Tensor:
        res = self.image_res
        if isinstance(item, Image.Image):  # eval_image's resize, on an image already decoded
            pixels = TF.pil_to_tensor(item.convert("RGB"))
            return normalize(TF.resize(pixels, [res, res], interpolation=InterpolationMode.BICUBIC, antialias=True))
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        out = eval_transform(data, res)
        if out is None:
            raise ValueError(f"{item if not isinstance(item, bytes) else 'bytes'}: not a decodable image")
        return out

    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ``input_ids``, ``attention_mask`` (B, T) on :attr:`device` (cleaned as in training)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        d = self.cfg.data
        ids, mask = tokenize(self.tokenizer, [pre_caption(t, d.max_words) for t in texts], d.max_text_len, d.append_sep)
        return ids.to(self.device), mask.to(self.device)

    def tokens(self, text: str) -> list[str]:
        """The model's tokens of one text ([CLS] first), e.g. to label per-token maps."""
        ids, _ = self.tokenize(text)
        return self.tokenizer.convert_ids_to_tokens(ids[0].tolist())

    def _autocast(self):
        return autocast_context(self.precision, self.device)

    # -- features and scores --------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """(B, E) L2-normalised ITC features of the images."""
        with self._autocast():
            tokens = self.model.encode_image(self.preprocess_images(images))  # (B, 1+N, Dv)
        return self.model.image_features(tokens)

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        """(B, E) L2-normalised ITC features of the texts."""
        ids, mask = self.tokenize(texts)
        with self._autocast():
            hidden = self.model.encode_text(ids, mask)  # (B, T, C)
        return self.model.text_features(hidden)

    @torch.no_grad()
    def itc_similarity(self, images, texts) -> torch.Tensor:
        """(Bi, Bt) image-text similarities as ITC scores them: cosine / temperature."""
        temp = self.model.temp.float().clamp(self.cfg.model.temp_min, self.cfg.model.temp_max)
        return self.image_features(images) @ self.text_features(texts).T / temp

    def _pairs(self, images, texts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pixels = self.preprocess_images(images)
        ids, mask = self.tokenize(texts)
        if pixels.shape[0] == ids.shape[0]:
            return pixels, ids, mask, None
        if pixels.shape[0] != 1:
            raise ValueError(f"{pixels.shape[0]} images for {ids.shape[0]} texts: pass as many, or one image")
        return pixels, ids, mask, torch.zeros(ids.shape[0], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def multimodal_features(self, images, texts, cls_only: bool = False) -> torch.Tensor:
        """Fusion-encoder states of (image, text) pairs.

        Returns:
            (B, T, C) multimodal hidden states (zero-padded columns are padding tokens'
            states), or their [CLS] (B, C) with ``cls_only`` (the ITM head's input).
        """
        pixels, ids, mask, index = self._pairs(images, texts)
        with self._autocast():
            fused = self.model.fuse(self.model.encode_text(ids, mask), mask, self.model.encode_image(pixels), index)
        fused = fused.float()
        return fused[:, 0] if cls_only else fused

    @torch.no_grad()
    def itm_probability(self, images, texts) -> torch.Tensor:
        """(B,) probability that image b matches text b (softmax of the ITM head)."""
        fused = self.multimodal_features(images, texts, cls_only=True)  # (B, C)
        return self.model.itm_head(fused).softmax(dim=-1)[:, 1]

    # -- Grad-CAM -------------------------------------------------------------------------------
    def explain(
        self, image: ImageInput, text: str, variant: str = "itm", layer: int | None = None
    ) -> tuple[GradCam, list[tuple[str, torch.Tensor]]]:
        """Grad-CAM heat map of one text over one image (:mod:`albef_ray.eval.gradcam`).

        Args:
            image: one image; text: one text.
            variant: ``"itm"`` (cross-attention of a fusion layer, ITM match logit) or
                ``"itc"`` (the ViT's [CLS] self-attention, ITC similarity).
            layer: 0-based layer index; default 2 (the 3rd fusion layer; see
                :func:`~albef_ray.eval.gradcam.default_layer` for smaller sizes) for itm, -1
                (the last ViT block) for itc.

        Returns:
            The :class:`GradCam` (``expression`` (1, G, G), ``tokens`` (1, T, G, G) for itm) and
            ``[(word, (G, G) map), ...]`` for itm (word pieces merged; empty for itc).
        """
        layer = default_layer(self.model, variant) if layer is None else layer
        pixels, ids, mask, _ = self._pairs(image, text)
        if variant == "itm":
            cam = itm_gradcam(self.model, pixels, ids, mask, layer, precision=self.precision)
            return cam, word_maps(self.tokenizer.convert_ids_to_tokens(ids[0].tolist()), cam.tokens[0])
        cam = itc_gradcam(self.model, pixels, ids, mask, layer, precision=self.precision)
        return cam, []


def _config(
    config: AlbefConfig | PathLike | None, weights: Path | None, size: str | None, image_res: int | None
) -> AlbefConfig:
    """Explicit config, else the checkpoint folder's ``config.yaml``, else the defaults (no hub inits)."""
    if isinstance(config, AlbefConfig):
        cfg = config
    elif config is not None:
        cfg = load_config(config)
    elif weights is not None and (weights.parent / CONFIG_FILE).is_file():
        cfg = load_config(weights.parent / CONFIG_FILE)
        log.info("config from %s", weights.parent / CONFIG_FILE)
    else:  # a bare model never downloads ViT / BERT inits on its own
        cfg = build_config({"model": {"vit_init": None, "bert_init": None}})
    overrides = {k: v for k, v in (("model.size", size), ("model.image_res", image_res)) if v is not None}
    return with_overrides(cfg, overrides) if overrides else cfg


def load(
    checkpoint: PathLike | None = None,
    size: str | None = None,
    image_res: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    tokenizer=None,
    config: AlbefConfig | PathLike | None = None,
) -> AlbefModel:
    """Build an ALBEF, load its weights and preprocessing, and return it ready in eval mode.

    Args:
        checkpoint: a released ALBEF ``.pth`` (official key layout), an albef-ray ``state.pt``,
            checkpoint directory or run directory (the latest checkpoint); None: the config's
            ``model.checkpoint``, else initial weights (random without a config).
        size: registered model size; default the config's (``albef_base`` by default).
        image_res: input resolution (position embeddings are interpolated); default the config's.
        device: where to run; precision: ``"fp32"`` or ``"bf16"`` (autocast where supported).
        tokenizer: a tokenizer object, or a hub name / directory; default ``cfg.data.tokenizer``.
        config: an :class:`~albef_ray.config.AlbefConfig` or a YAML file; default the
            ``config.yaml`` beside an albef-ray checkpoint, else the defaults.

    Returns:
        An :class:`AlbefModel`.
    """
    weights = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    cfg = _config(config, weights, size, image_res)
    model = load_eval_model(cfg, weights)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer or cfg.data.tokenizer)
    return AlbefModel(model, tokenizer, cfg, torch.device(device), precision)
