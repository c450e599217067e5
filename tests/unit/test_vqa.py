"""VQA: the answer decoder, its loss, official checkpoint layouts, batched answer ranking, VQA accuracy."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertLMHeadModel

from albef_ray.config import build_config
from albef_ray.eval.vqa import normalize_answer, vqa_accuracy, write_results
from albef_ray.eval.vqa_rank import rank_answers, rank_answers_reference
from albef_ray.model.adapters import native_to_albef, native_to_hf_bert
from albef_ray.model.albef import build_model
from albef_ray.model.decoder import AnswerDecoder
from albef_ray.model.loading import load_albef_checkpoint
from albef_ray.model.registry import get_arch
from albef_ray.model.text import BertLayer, CrossAttention
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.objectives.vqa import VQATask, answer_lm_loss, weighted_answer_loss
from tests.conftest import ALL_SIZES, make_batch, tiny_cfg

TINY = ["albef_tiny", "albef_tiny_64"]


def vqa_cfg(**sections):
    return build_config({
        "task": "vqa", "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "train": {"batch_size": 4, "num_workers": 1}, **sections,
    })


def answers(b=4, k=3, a=6, seed=0, vocab=1000):
    """(B, K, A) answers [CLS] x.. [SEP]: question i has 1 + i % k real ones, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, k, a, dtype=torch.long)
    mask = torch.zeros_like(ids)
    weights = torch.zeros(b, k)
    for i in range(b):
        n = 1 + i % k
        for j in range(n):
            length = 3 + (i + j) % (a - 2)
            ids[i, j, 0], ids[i, j, length - 1] = 2, 3
            ids[i, j, 1 : length - 1] = torch.randint(5, vocab, (length - 2,), generator=g)
            mask[i, j, :length] = 1
            weights[i, j] = (j + 1) / (n * (n + 1) / 2)
    return ids, mask, weights


def scale_(module: torch.nn.Module, factor: float = 6.0) -> None:
    """Larger random weights: a fresh model's near-uniform outputs make every ranking a tie."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.mul_(factor)


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("size", ALL_SIZES)
def test_decoder_shapes(size):
    arch = get_arch(size)
    decoder = AnswerDecoder(arch).eval()
    assert len(decoder.layers) == arch.fusion_layers
    states, q_mask = torch.randn(2, 5, arch.text_width), torch.ones(2, 5, dtype=torch.long)
    ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0], [2, 5, 3, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        hidden = decoder(ids, mask, states, q_mask, torch.tensor([0, 1, 1]))
        assert hidden.shape == (3, 4, arch.text_width)
        assert decoder.logits(hidden).shape == (3, 4, arch.vocab_size)


@pytest.mark.parametrize("size", TINY)
def test_task_forward_shapes_and_every_parameter_trains(size):
    cfg = vqa_cfg(model={"size": size, "vit_init": None, "bert_init": None})
    task = VQATask(build_model(size), cfg).train()
    assert not any(hasattr(task.model, p) for p in ("vision_proj", "text_proj", "itm_head", "mlm_head", "temp"))
    image, ids, att = make_batch(task.arch)
    out = task(image, ids, att, alpha=0.4, answer_ids=(a := answers())[0], answer_mask=a[1], answer_weights=a[2])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and 0 <= out["vqa_token_acc"] <= 1
    out["loss"].backward()
    assert [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None] == []


def test_decoder_is_causal_and_masks_question_padding():
    arch = get_arch("albef_tiny")
    decoder = AnswerDecoder(arch).eval()
    states, q_mask = torch.randn(1, 6, arch.text_width), torch.tensor([[1, 1, 1, 1, 0, 0]])
    ids = torch.tensor([[2, 11, 12, 13, 3]])
    with torch.no_grad():
        base = decoder(ids, torch.ones_like(ids), states, q_mask)
        later = decoder(torch.tensor([[2, 11, 40, 41, 42]]), torch.ones_like(ids), states, q_mask)
        noise = states.clone()
        noise[:, 4:] = 100.0  # padded question tokens
        padded = decoder(ids, torch.ones_like(ids), noise, q_mask)
    torch.testing.assert_close(later[:, :2], base[:, :2])  # position t sees tokens <= t only
    assert not torch.allclose(later[:, 2:], base[:, 2:])
    torch.testing.assert_close(padded, base)


def test_cached_start_gives_the_full_forward():
    arch = get_arch("albef_tiny")
    decoder = AnswerDecoder(arch).eval()
    scale_(decoder, 3.0)
    states, q_mask = torch.randn(3, 6, arch.text_width), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    ids = torch.tensor([[2, 11, 12, 3], [2, 13, 14, 3], [2, 15, 3, 3]])
    index = torch.tensor([2, 0, 1])
    with torch.no_grad():
        full = decoder(ids, torch.ones_like(ids), states, q_mask, index)
        cache = decoder.start(2, states, q_mask)
        cached = decoder.after_start(ids[:, 1:], cache, states, q_mask, index)
    torch.testing.assert_close(cache.hidden[index], full[:, :1])
    torch.testing.assert_close(cached, full[:, 1:])


def test_text_layers_default_behaviour_unchanged():
    arch = get_arch("albef_tiny")
    layer = BertLayer(arch, 0.0, cross=True).eval()
    assert layer.cross_attn.kv.in_features == arch.vision_width  # default context: image tokens
    x, image = torch.randn(2, 5, arch.text_width), torch.randn(3, 9, arch.vision_width)
    index = torch.tensor([2, 0])
    cross: CrossAttention = layer.cross_attn
    with torch.no_grad():
        plain = cross(x, image, index)
        masked = cross(x, image, index, torch.ones(3, 9, dtype=torch.long))
        kv = cross.kv(image)[index]
        k, v = kv.chunk(2, dim=-1)
        split = lambda t: t.view(2, -1, arch.text_heads, arch.text_width // arch.text_heads).transpose(1, 2)
        attn = F.scaled_dot_product_attention(split(cross.q(x)), split(k), split(v)).transpose(1, 2).reshape(2, 5, -1)
        manual = cross.norm(x + cross.out(attn))
    torch.testing.assert_close(masked, plain)
    torch.testing.assert_close(plain, manual)


# ----------------------------------------------------------------------------- loss


def test_answer_lm_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # (1, 2, 3): two positions
    targets = torch.tensor([[0, 1]])
    expected = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.8)))
    torch.testing.assert_close(answer_lm_loss(logits, targets), expected.reshape(1))
    padded = answer_lm_loss(logits, torch.tensor([[0, -100]]))  # padding adds nothing
    torch.testing.assert_close(padded, -torch.log(torch.tensor([0.5])))
    soft = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # soft target = other tokens
    mixed = answer_lm_loss(logits, targets, soft, alpha=0.4)
    distill = -(torch.log(torch.tensor(0.25)) + torch.log(torch.tensor(0.1)))
    torch.testing.assert_close(mixed, (0.6 * expected + 0.4 * distill).reshape(1))
    # official: (weights * loss).sum() / batch size
    torch.testing.assert_close(weighted_answer_loss(torch.tensor([2.0, 4.0, 6.0]), torch.tensor([0.5, 0.5, 1.0]), 2),
                               torch.tensor((1.0 + 2.0 + 6.0) / 2))


def test_task_loss_equals_the_weighted_sum_over_real_answers():
    cfg = vqa_cfg(vqa={"distill": False})
    task = VQATask(build_model("albef_tiny"), cfg).eval()
    image, ids, att = make_batch(task.arch)
    a_ids, a_mask, weights = answers()
    out = task(image, ids, att, answer_ids=a_ids, answer_mask=a_mask, answer_weights=weights)
    with torch.no_grad():
        states = task.question_states(task.model, image, ids, att)
        total = 0.0
        for i in range(4):
            for j in range(3):
                if weights[i, j] == 0:
                    continue
                n = int(a_mask[i, j].sum())
                seq = a_ids[i, j, :n][None]
                logits = task.decoder.logits(task.decoder(seq, torch.ones_like(seq), states[i : i + 1], att[i : i + 1]))
                total += weights[i, j] * F.cross_entropy(logits[0, :-1], seq[0, 1:], reduction="sum")
    torch.testing.assert_close(out["vqa_loss"], total / 4)


def test_momentum_decoder_follows_the_ema():
    cfg = vqa_cfg(momentum={"momentum": 0.5})
    task = VQATask(build_model("albef_tiny"), cfg).train()
    with torch.no_grad():
        for p in task.decoder.parameters():
            p.add_(1.0)
    before = task.momentum_decoder.head.dense.weight.clone()
    online = task.decoder.head.dense.weight.clone()
    image, ids, att = make_batch(task.arch)
    a = answers()
    task(image, ids, att, alpha=0.4, answer_ids=a[0], answer_mask=a[1], answer_weights=a[2], update_momentum=True)
    torch.testing.assert_close(task.momentum_decoder.head.dense.weight, 0.5 * before + 0.5 * online)


# ----------------------------------------------------------------------------- checkpoints


def _official_vqa_state(task: VQATask) -> dict[str, torch.Tensor]:
    """The released vqa.pth layout: bare BertModel text_encoder, BertLMHeadModel text_decoder, *_m copies."""
    state = native_to_albef(task.state_dict(), task.arch.text_layers, finetuned=True)
    for native, official in (("decoder", "text_decoder"), ("momentum_decoder", "text_decoder_m")):
        sub = {k[len(native) + 1:]: v for k, v in task.state_dict().items() if k.startswith(native + ".")}
        sub = {k.replace("embeddings.", "text.embeddings.", 1) if k.startswith("embeddings.") else
               k.replace("layers.", "fusion.layers.", 1) if k.startswith("layers.") else
               k.replace("head.", "mlm_head.", 1): v for k, v in sub.items()}
        state.update({f"{official}.{k}": v for k, v in native_to_hf_bert(sub, text_layers=0).items()})
        state[f"{official}.bert.embeddings.position_ids"] = torch.arange(task.arch.max_position)[None]
    state["text_encoder.embeddings.position_ids"] = torch.arange(task.arch.max_position)[None]
    return state


def test_official_vqa_checkpoint_loads_with_no_missing_or_unused_keys(tmp_path):
    src = VQATask(build_model("albef_tiny"), vqa_cfg())
    with torch.no_grad():
        for p in src.state_dict().values():
            p.add_(torch.randn_like(p.float()).to(p.dtype))
    official = _official_vqa_state(src)
    assert {k.split(".")[0] for k in official} == {
        "visual_encoder", "text_encoder", "text_decoder", "visual_encoder_m", "text_encoder_m", "text_decoder_m"}
    assert "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight" in official
    assert "text_decoder.cls.predictions.decoder.weight" in official
    torch.save({"model": official}, tmp_path / "vqa.pth")
    dst = VQATask(build_model("albef_tiny"), vqa_cfg())
    report = load_albef_checkpoint(dst, str(tmp_path / "vqa.pth"))
    assert report.missing == [] and report.unused == [], str(report)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_official_decoder_layout_matches_a_hugging_face_lm_head_decoder():
    """text_decoder.* of a Hugging Face BertLMHeadModel (the layout xbert's decoder saves) gives its logits."""
    arch = get_arch("albef_tiny")
    config = BertConfig(vocab_size=arch.vocab_size, hidden_size=arch.text_width, num_hidden_layers=arch.fusion_layers,
                        num_attention_heads=arch.text_heads, intermediate_size=arch.text_intermediate,
                        max_position_embeddings=arch.max_position, layer_norm_eps=arch.layer_norm_eps,
                        is_decoder=True, add_cross_attention=True, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = BertLMHeadModel(config).eval()
    task = VQATask(build_model("albef_tiny"), vqa_cfg(vqa={"distill": False})).eval()
    rest, native = task.adapt_official_state({f"text_decoder.{k}": v for k, v in hf.state_dict().items()})
    assert rest == {}
    missing, unexpected = task.load_state_dict(native, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("decoder.")]
    ids = torch.tensor([[2, 17, 18, 3], [2, 19, 3, 0]])
    mask, states = (ids > 0).long(), torch.randn(2, 5, arch.text_width)
    q_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        ours = task.decoder.logits(task.decoder(ids, mask, states, q_mask))
        theirs = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=states, encoder_attention_mask=q_mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["official", "native"])
def test_pretraining_checkpoint_initialises_the_decoder_from_the_fusion_encoder(tmp_path, layout):
    src = PretrainTask(build_model("albef_tiny"), tiny_cfg())
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    state = native_to_albef(src.state_dict(), src.model.arch.text_layers) if layout == "official" else src.state_dict()
    torch.save({"model": state}, tmp_path / "pretrained.pth")
    task = VQATask(build_model("albef_tiny"), vqa_cfg())
    report = load_albef_checkpoint(task, str(tmp_path / "pretrained.pth"))
    assert report.missing == [], str(report)
    explained = ("model.vision_proj", "model.text_proj", "model.itm_head", "model.temp", "momentum.model.vision_proj",
                 "momentum.model.text_proj", "momentum.image_queue", "momentum.text_queue", "momentum.queue_ptr",
                 "momentum.index_queue")
    assert report.unused and all(k.startswith(explained) for k in report.unused), str(report)
    s = src.state_dict()
    for prefix, dec in (("model.", task.decoder), ("momentum.model.", task.momentum_decoder)):
        assert torch.equal(dec.layers[1].cross_attn.kv.weight, s[prefix + "fusion.layers.1.cross_attn.kv.weight"])
        assert torch.equal(dec.embeddings.word.weight, s[prefix + "text.embeddings.word.weight"])
        assert torch.equal(dec.head.dense.weight, s[prefix + "mlm_head.dense.weight"])
    assert torch.equal(task.model.fusion.layers[0].ffn.fc1.weight, s["model.fusion.layers.0.ffn.fc1.weight"])
    # a VQA checkpoint of our own reloads as is (its decoder is not re-seeded)
    torch.save({"model": task.state_dict()}, tmp_path / "vqa_native.pth")
    again = VQATask(build_model("albef_tiny"), vqa_cfg())
    report = load_albef_checkpoint(again, str(tmp_path / "vqa_native.pth"))
    assert report.missing == [] and report.unused == []
    for key, value in task.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


# ----------------------------------------------------------------------------- ranking


def _answer_list(m=30, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 8, (m,), generator=g)
    ids = torch.zeros(m, int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, n - 1] = 2, 3
        ids[i, 1 : n - 1] = torch.randint(5, 40 if i % 3 else vocab, (n - 2,), generator=g)  # shared first tokens too
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("k", [1, 7, 100])
def test_batched_ranking_equals_the_per_question_official_procedure(k):
    arch = get_arch("albef_tiny")
    torch.manual_seed(0)
    decoder = AnswerDecoder(arch).eval()
    scale_(decoder, 10.0)
    states, q_mask = 3 * torch.randn(9, 6, arch.text_width), torch.ones(9, 6, dtype=torch.long)
    q_mask[::2, 4:] = 0
    ids, mask = _answer_list()
    fast = rank_answers(decoder, states, q_mask, ids, mask, k, chunk_tokens=16)  # many chunks
    reference = rank_answers_reference(decoder, states, q_mask, ids, mask, k)
    assert torch.equal(fast.candidates, reference.candidates)
    torch.testing.assert_close(fast.scores, reference.scores, atol=1e-3, rtol=1e-4)
    assert torch.equal(fast.best, reference.best)
    assert k == 1 or len(set(fast.best.tolist())) > 1  # not a degenerate all-equal ranking


# ----------------------------------------------------------------------------- accuracy


def test_vqa_accuracy_by_hand():
    ten = lambda counts: [(a, c / 10) for a, c in counts.items()]
    # official 10-choose-9 averaging: 1, 2, 3 matching humans of 10 -> 0.3, 0.6, 0.9; 4 or more -> 1
    for matches, expected in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        answers = ten({"red": matches, "blue": 10 - matches} if matches < 10 else {"red": 10})
        assert vqa_accuracy("red", answers) == pytest.approx(expected)
    # min(#humans / 3, 1)
    assert vqa_accuracy("red", ten({"red": 1, "blue": 9}), leave_one_out=False) == pytest.approx(1 / 3)
    assert vqa_accuracy("red", ten({"red": 3, "blue": 7}), leave_one_out=False) == 1.0
    # normalisation: case, punctuation, articles, number words
    assert normalize_answer("  Two. ") == "2" and normalize_answer("a Dog!") == "dog"
    assert vqa_accuracy("2", ten({"two": 2, "2": 1, "3": 7})) == pytest.approx(0.9)
    assert vqa_accuracy("x", []) != vqa_accuracy("x", [])  # NaN without answers


def test_result_file_is_the_official_format(tmp_path):
    path = write_results([{"question_id": 262148000, "answer": "yes"}, {"question_id": "synth-1", "answer": "2"}],
                         tmp_path / "r" / "vqa_result.json")
    assert json.loads(path.read_text()) == [{"question_id": 262148000, "answer": "yes"},
                                            {"question_id": "synth-1", "answer": "2"}]


def test_config_defaults_are_the_official_settings():
    cfg = build_config({"task": "vqa"})
    assert (cfg.vqa.k_test, cfg.vqa.distill, cfg.vqa.accuracy, cfg.vqa.annotators) == (128, True, "leave_one_out", 10)
    assert cfg.mod.alpha == 0.4 and cfg.mod.alpha_warmup_epochs == 1.0
