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


def bert_scale_weights_(net: nn.Module, temp: float = 0.05) -> None:
    """In place: BERT-scale weights (std 0.02) and no LayerNorm left at 1/0, so a fidelity check
    cannot pass by symmetry of a fresh init; ``temp`` set as given."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(torch.randn_like(module.weight) * 0.05)
                module.bias.add_(torch.randn_like(module.bias) * 0.05)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, 0.02)
        net.temp.fill_(temp)


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
    def __init__(self, arch, embed_dim=256, dropout=0.0):
        super().__init__()
        cfg = BertConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.text_width,
            num_hidden_layers=arch.text_layers + arch.fusion_layers, num_attention_heads=arch.text_heads,
            intermediate_size=arch.text_intermediate, hidden_act="gelu", layer_norm_eps=arch.layer_norm_eps,
            max_position_embeddings=arch.max_position, type_vocab_size=arch.type_vocab_size,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
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


class ReferencePretrainStep(nn.Module):
    """The official training forward (model_pretrain.py ALBEF.forward) around ReferenceALBEF.

    Used by benchmarks/step.py as the side-by-side baseline: per-sample multinomial loops,
    separate positive / negative fusion passes, MLM re-running all 12 layers and the
    vocabulary projection on every token, as the official code does.
    """

    def __init__(self, arch, queue_size=65536, momentum=0.995, mlm_probability=0.15, dropout=0.1):
        super().__init__()
        self.net = ReferenceALBEF(arch, dropout=dropout)
        self.register_buffer("image_queue", F.normalize(torch.randn(256, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(256, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.queue_size, self.m, self.p, self.vocab = queue_size, momentum, mlm_probability, arch.vocab_size
        for name, p in self.net.named_parameters():
            if name.split(".")[0].endswith("_m"):
                p.requires_grad_(False)

    @torch.no_grad()
    def _momentum_update(self):
        n = self.net
        for a, b in ((n.visual_encoder, n.visual_encoder_m), (n.text_encoder, n.text_encoder_m),
                     (n.vision_proj, n.vision_proj_m), (n.text_proj, n.text_proj_m)):
            for p, p_m in zip(a.parameters(), b.parameters()):
                p_m.data = p_m.data * self.m + p.data * (1.0 - self.m)

    def _mask(self, ids):
        ids, labels = ids.clone(), ids.clone()
        masked = torch.bernoulli(torch.full(ids.shape, self.p, device=ids.device)).bool()
        masked[ids == 0] = False
        masked[ids == 101] = False
        labels[~masked] = -100
        replaced = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device)).bool() & masked
        ids[replaced] = 103
        rand = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device)).bool() & masked & ~replaced
        ids[rand] = torch.randint(self.vocab, ids.shape, device=ids.device)[rand]
        return ids, labels

    def forward(self, image, ids, att, alpha=0.4, mlm_input=None, itm_negatives=None):
        """The official loss; ``mlm_input`` (masked ids, labels) and ``itm_negatives``
        (neg_image, neg_text) replace the official sampling, as PretrainTask accepts them."""
        n = self.net
        with torch.no_grad():
            n.temp.clamp_(0.001, 0.5)
        image_embeds = n.visual_encoder.forward_features(image)
        image_feat = F.normalize(n.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = n.text_encoder.bert("text", att, input_ids=ids)
        text_feat = F.normalize(n.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = n.visual_encoder_m.forward_features(image)
            image_feat_m = F.normalize(n.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_feat_m = F.normalize(n.text_proj_m(n.text_encoder_m.bert("text", att, input_ids=ids)[:, 0]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            sim_targets = torch.zeros(image.shape[0], image_feat_all.shape[1], device=image.device)
            sim_targets.fill_diagonal_(1)
            t_i2t = alpha * F.softmax(image_feat_m @ text_feat_all / n.temp, 1) + (1 - alpha) * sim_targets
            t_t2i = alpha * F.softmax(text_feat_m @ image_feat_all / n.temp, 1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / n.temp
        sim_t2i = text_feat @ image_feat_all / n.temp
        loss_ita = (-(F.log_softmax(sim_i2t, 1) * t_i2t).sum(1).mean() - (F.log_softmax(sim_t2i, 1) * t_t2i).sum(1).mean()) / 2
        with torch.no_grad():  # dequeue and enqueue
            bs, ptr = image_feat_m.shape[0], int(self.queue_ptr)
            self.image_queue[:, ptr:ptr + bs] = image_feat_m.T
            self.text_queue[:, ptr:ptr + bs] = text_feat_m.T
            self.queue_ptr[0] = (ptr + bs) % self.queue_size

        out_pos = n.text_encoder.bert("fusion", att, encoder_embeds=text_embeds, encoder_hidden_states=image_embeds)
        with torch.no_grad():
            bs = image.shape[0]
            w_i2t = F.softmax(sim_i2t[:, :bs], 1) + 1e-4
            w_i2t.fill_diagonal_(0)
            w_t2i = F.softmax(sim_t2i[:, :bs], 1) + 1e-4
            w_t2i.fill_diagonal_(0)
        if itm_negatives is None:
            image_neg = torch.stack([image_embeds[torch.multinomial(w_t2i[b], 1).item()] for b in range(bs)])
            neg_idx = [torch.multinomial(w_i2t[b], 1).item() for b in range(bs)]
        else:
            image_neg, neg_idx = image_embeds[itm_negatives[0]], itm_negatives[1]
        text_neg, att_neg = text_embeds[neg_idx], att[neg_idx]
        out_neg = n.text_encoder.bert("fusion", torch.cat([att, att_neg]), encoder_embeds=torch.cat([text_embeds, text_neg]),
                                      encoder_hidden_states=torch.cat([image_neg, image_embeds]))
        vl = n.itm_head(torch.cat([out_pos[:, 0], out_neg[:, 0]]))
        loss_itm = F.cross_entropy(vl, torch.cat([torch.ones(bs), torch.zeros(2 * bs)]).long().to(vl.device))

        masked, labels = self._mask(ids) if mlm_input is None else mlm_input
        with torch.no_grad():
            logits_m = n.text_encoder_m.cls(n.text_encoder_m.bert("multi_modal", att, input_ids=masked, encoder_hidden_states=image_embeds_m))
        logits = n.text_encoder.cls(n.text_encoder.bert("multi_modal", att, input_ids=masked, encoder_hidden_states=image_embeds))
        loss_ce = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))
        distill = -(F.log_softmax(logits, -1) * F.softmax(logits_m, -1)).sum(-1)[labels != -100].mean()
        loss_mlm = (1 - alpha) * loss_ce + alpha * distill
        return {"loss": loss_mlm + loss_ita + loss_itm, "itc_loss": loss_ita, "itm_loss": loss_itm, "mlm_loss": loss_mlm}
