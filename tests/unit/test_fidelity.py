"""Fidelity: weights loaded through the ALBEF-checkpoint loader reproduce the official forward.

The reference (tests/reference_albef.py) re-states model_pretrain.py with Hugging Face's own
BERT layers and loads the released key layout strictly; we compare ITC similarities, ITM
logits and MLM logits for the same weights, inputs, masks and negatives in fp32 eval mode.
"""

import torch

from albef_ray.model.albef import build_model
from albef_ray.model.loading import load_albef_checkpoint
from albef_ray.objectives.mlm import SpecialTokens, mask_tokens
from albef_ray.objectives.pretrain import PretrainTask
from tests.conftest import make_batch, tiny_cfg
from tests.reference_albef import ReferenceALBEF, bert_scale_weights_


def _released_checkpoint(tmp_path, arch, queue_size):
    ref = ReferenceALBEF(arch)
    bert_scale_weights_(ref)
    state = dict(ref.state_dict())
    state["image_queue"] = torch.nn.functional.normalize(torch.randn(256, queue_size), dim=0)
    state["text_queue"] = torch.nn.functional.normalize(torch.randn(256, queue_size), dim=0)
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "albef_released.pth"
    torch.save({"model": state, "epoch": 3}, path)
    return ref.eval(), state, path


def test_outputs_match_official_forward(tmp_path):
    cfg = tiny_cfg(mod={"alpha": 0.0})
    arch = build_model("albef_tiny").arch
    ref, state, path = _released_checkpoint(tmp_path, arch, cfg.momentum.queue_size)
    task = PretrainTask(build_model("albef_tiny"), cfg)
    report = load_albef_checkpoint(task, str(path))
    assert not report.missing and not report.unused, str(report)
    task.eval()

    image, ids, att = make_batch(arch, b=4, t=12)
    masked, labels = mask_tokens(ids, arch.vocab_size, SpecialTokens(), 0.3, generator=torch.Generator().manual_seed(1))
    assert (labels != -100).any()
    neg_image, neg_text = torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])

    ours = task(image, ids, att, mlm_input=(masked, labels), itm_negatives=(neg_image, neg_text), return_outputs=True)
    sim_i2t, sim_t2i, itm_logits, mlm_logits = ref.outputs(
        image, ids, att, masked, (state["image_queue"], state["text_queue"]), neg_image, neg_text
    )
    torch.testing.assert_close(ours["sim_i2t"], sim_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["sim_t2i"], sim_t2i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["itm_logits"], itm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["mlm_logits"], mlm_logits, atol=1e-5, rtol=1e-5)
