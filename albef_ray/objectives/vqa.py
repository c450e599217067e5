"""The VQA fine-tuning task: an answer decoder trained with a weighted language-modelling loss.

ALBEF treats VQA as answer generation (paper Sec. 4.3, official ``model_vqa.py``): the image
and question go through the image, text and fusion encoders; a causal decoder
(:class:`~albef_ray.model.decoder.AnswerDecoder`) reads the fused question states and is
trained to produce each annotator answer ``[CLS] answer [SEP]``. A question's distinct answers
are weighted by annotator agreement (VQA: count / 10; Visual Genome: 0.5), and the loss is

    loss = sum over questions q, answers a of q:  w_qa * sum_t CE(token t of a)   / B

(the official ``(weights * answer_loss).sum() / image.size(0)``: token losses summed per answer,
answers weighted, normalised by the number of questions B).

Momentum distillation (``vqa.distill``): a momentum copy of the encoders and of the decoder
gives each answer token a soft target distribution q; each token's loss becomes
``(1 - alpha) CE(y) + alpha * CE(q)`` (alpha from :func:`~albef_ray.train.optim.alpha_at`,
``mod.alpha`` 0.4 ramped over the first epoch, as the official ``warm_up``). The official
``model_vqa.py`` passes the soft targets but not ``alpha`` to its decoder, whose default alpha
is 0, so the released VQA model was in effect trained without distillation (its momentum copy
is EMA'd and unused); we apply the alpha the paper describes. ``mod.alpha=0`` (or
``vqa.distill=false``, which also drops the momentum copy) reproduces the official behaviour.

The VQA model has no ITC projections, ITM head, temperature or encoder MLM head (the official
has none; the encoder's MLM head initialises the decoder's): they are removed from the ALBEF
this task wraps, so its state dict is the official ``vqa.pth`` layout and every parameter
receives a gradient (DDP without ``find_unused_parameters``).

Decoder initialisation: a checkpoint without decoder weights (an ALBEF pretraining checkpoint,
official or albef-ray) initialises the decoder from its fusion encoder on load (embeddings,
fusion layers 0..F-1 -> decoder layers 0..F-1, MLM head -> LM head; and the momentum copies
likewise), the rule of the official ``VQA.py``.
"""

from __future__ import annotations

import copy
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AlbefConfig
from ..model.adapters import hf_bert_to_native
from ..model.albef import ALBEF
from ..model.decoder import AnswerDecoder, decoder_state_from_encoder
from ..model.momentum import MomentumEncoder
from .blocks import distill_mix, ema_module, weighted_loss
from .mlm import IGNORE, SpecialTokens

log = logging.getLogger(__name__)

# ALBEF parts VQA does not use (official model_vqa.py has none of them).
UNUSED_PARTS = ("vision_proj", "text_proj", "itm_head", "mlm_head", "temp")


def answer_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, soft_targets: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """Per-answer language-modelling loss, token losses summed (official ``BertLMHeadModel``).

    Args:
        logits: (R, A-1, V) next-token logits at positions 0..A-2.
        targets: (R, A-1) tokens 1..A-1, ``IGNORE`` (-100) on padding.
        soft_targets: (R, A-1, V) momentum distributions, or None.
        alpha: weight of the soft-target cross-entropy.

    Returns:
        (R,) sum over valid tokens of ``(1 - alpha) CE(target) + alpha CE(soft target)``.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (R, A-1, V)
    valid = targets != IGNORE
    hard = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (R, A-1)
    loss = (hard * valid).sum(1)
    if soft_targets is not None:
        soft = -(soft_targets.float() * logp).sum(-1)  # (R, A-1)
        loss = distill_mix(loss, (soft * valid).sum(1), alpha)
    return loss


def weighted_answer_loss(per_answer: torch.Tensor, weights: torch.Tensor, num_questions: int) -> torch.Tensor:
    """``sum(weights * per_answer) / num_questions`` (official: normalised by the batch size)."""
    return (weights.to(per_answer.dtype) * per_answer).sum() / max(num_questions, 1)


def _drop_unused(model: nn.Module) -> None:
    for name in UNUSED_PARTS:
        if hasattr(model, name):
            delattr(model, name)


class VQATask(nn.Module):
    """VQA fine-tuning: fused question states -> answer decoder, weighted LM loss, optional MoD.

    Args:
        model: the online ALBEF (its unused heads are removed here).
        cfg: the config tree; reads ``vqa``, ``momentum.momentum``, ``model.text_dropout``.
        special: unused (same constructor as the other tasks).
    """

    batch_keys = ("answer_ids", "answer_mask", "answer_weights")

    def __init__(self, model: ALBEF, cfg: AlbefConfig, special: SpecialTokens = SpecialTokens()):
        super().__init__()
        self.cfg = cfg
        self.decoder = AnswerDecoder(model.arch, cfg.model.text_dropout)
        init = decoder_state_from_encoder(model.state_dict())  # the configured inits' fusion encoder
        self.decoder.load_state_dict(_fitting(init, self.decoder.state_dict()), strict=False)
        self.momentum: MomentumEncoder | None = None
        self.momentum_decoder: AnswerDecoder | None = None
        if cfg.vqa.distill:
            self.momentum = MomentumEncoder(model, cfg.momentum.momentum, use_queue=False)
            for name in ("image_queue", "text_queue", "queue_ptr"):  # no ITC: no queues in the state
                setattr(self.momentum, name, None)
            _drop_unused(self.momentum.model)
            self.momentum_decoder = copy.deepcopy(self.decoder).requires_grad_(False)
        _drop_unused(model)
        self.model = model
        self.register_load_state_dict_pre_hook(_init_decoder_on_load)
        self.register_load_state_dict_post_hook(_warn_missing_decoder)

    @property
    def arch(self):
        return self.model.arch

    # -- official layout ----------------------------------------------------------------------
    def adapt_official_state(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Take ``text_decoder[_m].*`` (an official ``BertLMHeadModel``) out of an official state.

        ``text_decoder.bert.embeddings.*`` -> ``decoder.embeddings.*``,
        ``text_decoder.bert.encoder.layer.i.*`` -> ``decoder.layers.i.*`` (cross-attention included),
        ``text_decoder.cls.predictions.*`` -> ``decoder.head.*`` (its ``decoder.weight`` is tied to
        the word embeddings and ``decoder.bias`` equals ``predictions.bias``: both dropped);
        ``text_decoder_m.*`` likewise -> ``momentum_decoder.*``. A pretraining checkpoint has no
        ``text_decoder``: the load hook then copies the fusion encoder (official ``VQA.py``).

        Returns:
            (the rest of ``state``, the decoder weights under native names).
        """
        native: dict[str, torch.Tensor] = {}
        for stem, target in (("text_decoder", "decoder."), ("text_decoder_m", "momentum_decoder.")):
            sub = {k[len(stem) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(stem + ".")]}
            if not sub:
                continue
            mapped, unused = hf_bert_to_native(sub, text_layers=0)  # every layer is a "fusion" (cross) layer
            if unused:
                raise ValueError(f"{stem}: keys with no place in the answer decoder: {unused[:5]}")
            native.update({target + k: v for k, v in decoder_state_from_encoder(mapped).items()})
        return state, native

    # -- training ------------------------------------------------------------------------------
    def question_states(self, model: ALBEF, image: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """Image + question through the encoders: (B, T, C) fused question states."""
        image_tokens = model.encode_image(image)  # (B, 1+N, Dv)
        return model.fuse(model.encode_text(input_ids, attention_mask), attention_mask, image_tokens)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        self.momentum.update(self.model)
        ema_module(self.momentum_decoder, self.decoder, self.momentum.effective_momentum())

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        generator: torch.Generator | None = None,
        answer_ids: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        update_momentum: bool = True,
        enqueue: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One fine-tuning step's loss.

        Args:
            image: (B, 3, H, W) normalised images.
            input_ids, attention_mask: (B, T) tokenised questions.
            alpha: momentum-distillation weight of this step (used when ``vqa.distill``).
            generator: unused (nothing is sampled).
            answer_ids, answer_mask: (B, K, A) each question's answers ``[CLS] answer [SEP]``,
                padded answers all 0 (:func:`~albef_ray.data.collate.tokenize_answers`).
            answer_weights: (B, K) each answer's weight; 0 for padded answers.
            update_momentum: run the EMA first (training mode only).
            enqueue: unused (no queues).

        Returns:
            ``loss``, ``vqa_loss`` and ``vqa_token_acc`` (argmax accuracy over the answer tokens).
        """
        if answer_ids is None or answer_mask is None or answer_weights is None:
            raise ValueError("VQA fine-tuning needs answer_ids, answer_mask and answer_weights with the batch")
        b = image.shape[0]
        q_index, k_index = answer_mask[:, :, 0].nonzero(as_tuple=True)  # the real answers: (R,) each
        ids, mask = answer_ids[q_index, k_index], answer_mask[q_index, k_index]  # (R, A)
        weights = answer_weights[q_index, k_index].float()  # (R,)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # (R, A-1): position t predicts t + 1

        distill = self.momentum is not None
        if distill and self.training and update_momentum:
            self._momentum_update()
        states = self.question_states(self.model, image, input_ids, attention_mask)  # (B, T, C)
        hidden = self.decoder(ids, mask, states, attention_mask, q_index)  # (R, A, C)
        logits = self.decoder.logits(hidden[:, :-1])  # (R, A-1, V)

        soft = None
        if distill and alpha > 0:
            with torch.no_grad():
                states_m = self.question_states(self.momentum.model, image, input_ids, attention_mask)
                hidden_m = self.momentum_decoder(ids, mask, states_m, attention_mask, q_index)
                soft = F.softmax(self.momentum_decoder.logits(hidden_m[:, :-1]).float(), dim=-1)  # (R, A-1, V)
        per_answer = answer_lm_loss(logits, targets, soft, alpha if distill else 0.0)  # (R,)
        out = {"vqa_loss": weighted_answer_loss(per_answer, weights, b)}
        with torch.no_grad():
            valid = targets != IGNORE
            correct = (logits.argmax(-1) == targets) & valid
            out["vqa_token_acc"] = correct.sum().float() / valid.sum().clamp_min(1)
        out["loss"] = weighted_loss(out, {"vqa_loss": 1.0})
        return out


def _fitting(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries of ``state`` whose name and shape exist in ``target`` (a fusion cross-attention
    reading vision_width != text_width cannot seed the decoder's, which reads text states)."""
    return {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}


_MLM_HEAD = re.compile(r"^(momentum\.)?model\.mlm_head\.")


def _init_decoder_on_load(module: VQATask, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Load pre-hook: a state without decoder weights seeds the decoder from its fusion encoder.

    ``model.{text.embeddings, fusion, mlm_head}.*`` -> ``decoder.*`` (and ``momentum.model.*``
    -> ``momentum_decoder.*``, else a copy of the decoder), as the official ``VQA.py`` moves the
    pretrained text encoder's fusion layers and MLM head into its decoder. The encoder's MLM
    head is consumed (the VQA model has none). A state that has decoder weights is left alone.
    """
    keys = list(state_dict)
    for name, source in (("decoder", "model."), ("momentum_decoder", "momentum.model.")):
        target = getattr(module, name)
        if target is None or any(k.startswith(f"{prefix}{name}.") for k in keys):
            continue
        encoder = {k[len(prefix + source):]: v for k, v in state_dict.items() if k.startswith(prefix + source)}
        seeded, origin = _fitting(decoder_state_from_encoder(encoder), target.state_dict()), "fusion encoder"
        if not seeded and name == "momentum_decoder":  # no momentum weights: copy the (online) decoder
            start = f"{prefix}decoder."
            seeded, origin = {k[len(start):]: v for k, v in state_dict.items() if k.startswith(start)}, "decoder"
        if seeded:
            state_dict.update({f"{prefix}{name}.{k}": v for k, v in seeded.items()})
            log.info("%s: %d tensors from the checkpoint's %s", name, len(seeded), origin)
    for key in keys:  # the encoder's MLM head now lives in the decoder
        if _MLM_HEAD.match(key[len(prefix):]):
            del state_dict[key]


def _warn_missing_decoder(module: VQATask, incompatible) -> None:
    """Load post-hook: the checkpoint loader reports missing keys under ``model.`` only."""
    lost = [k for k in incompatible.missing_keys if k.split(".", 1)[0] in ("decoder", "momentum_decoder")]
    if lost:
        log.warning("answer decoder weights missing from the checkpoint (%d, kept as initialised): %s",
                    len(lost), ", ".join(lost[:5]))
