"""An independent reference of the official ALBEF forward, for fidelity tests only.

Built from Hugging Face's own BERT modules (BertEmbeddings, BertLayer with cross-attention,
BertOnlyMLMHead) in the official key layout (``text_encoder.bert.encoder.layer.N...``),
with the official masking arithmetic (additive -10000 masks), so that a checkpoint in the
released layout loads into it *strictly* and its outputs can be compared with albef-ray's.
It re-states the math of salesforce/ALBEF models/model_pretrain.py; it shares no code with
albef_ray.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead


class _Bert(nn.Module):
    def __init__(self, cfg: BertConfig, fusion_layer: int):
        super().__init__()
        fusion_cfg = copy.deepcopy(cfg)
        fusion_cfg.is_decoder, fusion_cfg.add_cross_attention = True, True
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(fusion_cfg if i >= fusion_layer else cfg, layer_idx=i) for i in range(cfg.num_hidden_layers)
        )
        self.fusion_layer = fusion_layer

    def forward(self, mode, attention_mask, input_ids=None, encoder_embeds=None, encoder_hidden_states=None):
        ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # official extended mask
        if mode == "fusion":
            x, layers = encoder_embeds, range(self.fusion_layer, len(self.encoder.layer))
        else:
            x = self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
            layers = range(self.fusion_layer) if mode == "text" else range(len(self.encoder.layer))
        for i in layers:
            if i >= self.fusion_layer:
                x = self.encoder.layer[i](x, ext, encoder_hidden_states=encoder_hidden_states)
            else:
                x = self.encoder.layer[i](x, ext)
        return x


class _TextEncoder(nn.Module):  # BertForMaskedLM-shaped: .bert and .cls
    def __init__(self, cfg, fusion_layer):
        super().__init__()
        self.bert = _Bert(cfg, fusion_layer)
        self.cls = BertOnlyMLMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias  # tied, as in HF 4.x BERT


class ReferenceALBEF(nn.Module):
    def __init__(self, arch, embed_dim=256):
        super().__init__()
        cfg = BertConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.text_width,
            num_hidden_layers=arch.text_layers + arch.fusion_layers, num_attention_heads=arch.text_heads,
            intermediate_size=arch.text_intermediate, hidden_act="gelu", layer_norm_eps=arch.layer_norm_eps,
            max_position_embeddings=arch.max_position, type_vocab_size=arch.type_vocab_size,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        cfg._attn_implementation = "eager"
        self.visual_encoder = VisionTransformer(
            img_size=arch.image_res, patch_size=arch.patch_size, embed_dim=arch.vision_width,
            depth=arch.vision_depth, num_heads=arch.vision_heads, mlp_ratio=arch.vision_mlp_ratio,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
        )
        self.text_encoder = _TextEncoder(cfg, arch.text_layers)
        self.vision_proj = nn.Linear(arch.vision_width, embed_dim)
        self.text_proj = nn.Linear(arch.text_width, embed_dim)
        self.itm_head = nn.Linear(arch.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)

    @torch.no_grad()
    def outputs(self, image, ids, att, masked_ids, queues, neg_image, neg_text):
        """ITC similarities, ITM logits and MLM logits as model_pretrain.py computes them."""
        image_queue, text_queue = queues
        image_embeds = self.visual_encoder.forward_features(image)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = self.text_encoder.bert("text", att, input_ids=ids)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        image_embeds_m = self.visual_encoder_m.forward_features(image)
        image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
        text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m.bert("text", att, input_ids=ids)[:, 0]), dim=-1)
        image_feat_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp

        out_pos = self.text_encoder.bert("fusion", att, encoder_embeds=text_embeds, encoder_hidden_states=image_embeds)
        text_all = torch.cat([text_embeds, text_embeds[neg_text]])
        att_all = torch.cat([att, att[neg_text]])
        image_all = torch.cat([image_embeds[neg_image], image_embeds])
        out_neg = self.text_encoder.bert("fusion", att_all, encoder_embeds=text_all, encoder_hidden_states=image_all)
        itm_logits = self.itm_head(torch.cat([out_pos[:, 0], out_neg[:, 0]]))

        mlm_hidden = self.text_encoder.bert("multi_modal", att, input_ids=masked_ids, encoder_hidden_states=image_embeds)
        mlm_logits = self.text_encoder.cls(mlm_hidden)
        return sim_i2t, sim_t2i, itm_logits, mlm_logits
