"""Retrieval evaluation math: recall against hand-built rankings, and what the ITM re-rank may change."""

import pytest
import torch

from albef_ray.config import EvalConfig
from albef_ray.eval import fill_outside_topk, itm_scores, recall_metrics, retrieval_scores
from albef_ray.eval import retrieval
from albef_ray.eval.retrieval import embed_images, embed_texts
from albef_ray.model.albef import build_model
from tests.conftest import make_batch

# Three images; image 0 has captions 0, 1; image 1 has 2, 3, 4; image 2 has 5.
TXT2IMG = torch.tensor([0, 0, 1, 1, 1, 2])
IMG2TXT = [[0, 1], [2, 3, 4], [5]]


def _i2t_from_orders(orders, n_txt=6):
    """Scores that rank each image's captions in the given order (first = best), no ties."""
    scores = torch.zeros(len(orders), n_txt)
    for i, order in enumerate(orders):
        for position, j in enumerate(order):
            scores[i, j] = float(n_txt - position)
    return scores


def test_text_retrieval_counts_the_best_ranked_correct_caption():
    # image 0: its caption 1 is 3rd (rank 2); image 1: caption 4 first; image 2: caption 5 is 6th (rank 5)
    score_i2t = _i2t_from_orders([[2, 3, 1, 0, 4, 5], [4, 0, 2, 1, 3, 5], [0, 1, 2, 3, 4, 5]])
    score_t2i = torch.eye(3)[TXT2IMG]  # every caption finds its image first
    m = recall_metrics(score_i2t, score_t2i, TXT2IMG, IMG2TXT)
    assert m["txt_r1"] == pytest.approx(100 / 3)  # only image 1
    assert m["txt_r5"] == pytest.approx(200 / 3)  # images 0 and 1 (ranks 2 and 0); image 2 is at rank 5
    assert m["txt_r10"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert m["img_r1"] == m["img_r5"] == m["img_r10"] == m["img_r_mean"] == 100.0
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + 100.0) / 2)


def test_image_retrieval_ranks_each_caption_query():
    score_i2t = torch.eye(3)[TXT2IMG].T.contiguous()  # each image's captions on top
    # caption rows: correct image at rank 0, 1, 2, 0, 0, 1
    score_t2i = torch.tensor([
        [3.0, 2.0, 1.0], [2.0, 3.0, 1.0], [3.0, 1.0, 2.0],
        [1.0, 3.0, 2.0], [0.0, 3.0, 2.0], [1.0, 3.0, 2.0],
    ])
    m = recall_metrics(score_i2t, score_t2i, TXT2IMG, IMG2TXT)
    assert m["img_r1"] == pytest.approx(100 * 3 / 6)
    assert m["img_r5"] == m["img_r10"] == 100.0
    assert m["txt_r1"] == 100.0


def test_ties_are_pessimistic_so_a_constant_model_scores_nothing():
    n_img, n_txt = 20, 100  # 5 captions each: more wrong candidates than K for both directions
    txt2img = torch.arange(n_img).repeat_interleave(5)
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(n_img)]
    m = recall_metrics(torch.zeros(n_img, n_txt), torch.zeros(n_txt, n_img), txt2img, img2txt)
    assert all(value == 0.0 for value in m.values()), m


def test_a_correct_item_tied_with_a_wrong_one_ranks_after_it():
    score_i2t = torch.tensor([[5.0, 1.0, 5.0, 0.0, 0.0, 0.0]] + [[0.0] * 6] * 2)
    score_i2t[1, 2], score_i2t[2, 5] = 9.0, 9.0
    score_t2i = torch.eye(3)[TXT2IMG]
    score_t2i[0] = torch.tensor([2.0, 2.0, 1.0])  # caption 0's image tied with image 1
    m = recall_metrics(score_i2t, score_t2i, TXT2IMG, IMG2TXT)
    # image 0: caption 0 ties with wrong caption 2 at 5.0 -> rank 1, a miss at R@1 only
    assert m["txt_r1"] == pytest.approx(200 / 3) and m["txt_r5"] == 100.0
    assert m["img_r1"] == pytest.approx(500 / 6) and m["img_r5"] == 100.0
    # a tie among the correct captions themselves costs nothing
    score_i2t[0] = torch.tensor([5.0, 5.0, 1.0, 0.0, 0.0, 0.0])
    assert recall_metrics(score_i2t, score_t2i, TXT2IMG, IMG2TXT)["txt_r1"] == 100.0


def test_nan_scores_rank_last():
    score_i2t = torch.eye(3)[TXT2IMG].T.contiguous()
    score_t2i = torch.eye(3)[TXT2IMG]
    score_t2i[0, 0] = float("nan")  # caption 0's correct image: NaN -> after both wrong ones
    m = recall_metrics(score_i2t, score_t2i, TXT2IMG, IMG2TXT)
    assert m["img_r1"] == pytest.approx(500 / 6)
    score_t2i[0] = float("nan")  # every image NaN: all tie at the bottom, the correct one last
    assert recall_metrics(score_i2t, score_t2i, TXT2IMG, IMG2TXT)["img_r1"] == pytest.approx(500 / 6)


def test_recall_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="at least one correct"):
        recall_metrics(torch.zeros(3, 6), torch.zeros(6, 3), TXT2IMG, [[0, 1], [], [2, 3, 4, 5]])
    with pytest.raises(ValueError, match="score_t2i"):
        recall_metrics(torch.zeros(3, 6), torch.zeros(3, 6), TXT2IMG, IMG2TXT)


def test_fill_outside_topk_keeps_itc_order_strictly_below_the_reranked():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(4, 30, generator=g) * 2 - 1
    top = sims.topk(5, dim=1).indices
    new = torch.randn(4, 5, generator=g) * 50  # ITM logits on any scale, including far below -100
    new[0] = -500.0
    out = fill_outside_topk(sims, top, new)
    assert torch.equal(out.gather(1, top), new)
    outside = torch.ones_like(sims, dtype=torch.bool).scatter_(1, top, False)
    for q in range(4):
        rest = out[q][outside[q]]
        assert rest.max() < new[q].min()
        assert torch.equal(rest.argsort(), sims[q][outside[q]].argsort())  # ITC order untouched


@pytest.fixture(scope="module")
def tiny_inputs():
    torch.manual_seed(0)
    model = build_model("albef_tiny").eval()
    # 12 images, 36 captions of different lengths (right-padded)
    images, _, _ = make_batch(model.arch, b=12, t=4, seed=1)
    _, ids, mask = make_batch(model.arch, b=36, t=11, seed=2)
    return model, images, ids, mask


def _sims(model, images, ids, mask):
    _, image_feat = embed_images(model, images, 5, torch.device("cpu"))
    _, text_feat = embed_texts(model, ids, mask, 5, torch.device("cpu"))
    return image_feat @ text_feat.T


@pytest.mark.parametrize("k", [4, 12, 100])
def test_the_rerank_reorders_only_each_querys_top_k(tiny_inputs, k):
    model, images, ids, mask = tiny_inputs
    cfg = EvalConfig(k_test=k, batch_size=5, rerank_batch=17)
    score_i2t, score_t2i = retrieval_scores(model, images, ids, mask, cfg)
    sims = _sims(model, images, ids, mask)
    for scores, sim in ((score_i2t, sims), (score_t2i, sims.T)):
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        inside = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top, True)
        assert not torch.equal(scores.gather(1, top), sim.gather(1, top))  # the top k really were re-scored
        for q in range(sim.shape[0]):
            if inside[q].all():
                continue
            assert scores[q][~inside[q]].max() < scores[q][inside[q]].min()
            assert torch.equal(scores[q][~inside[q]].argsort(), sim[q][~inside[q]].argsort())


@pytest.mark.parametrize("rerank_batch", [1, 7, 4096])
def test_batched_rerank_equals_the_per_query_loop(tiny_inputs, rerank_batch):
    model, images, ids, mask = tiny_inputs
    cfg = EvalConfig(k_test=5, batch_size=64, rerank_batch=rerank_batch)
    batched = retrieval_scores(model, images, ids, mask, cfg)
    per_query = retrieval_scores(model, images, ids, mask, cfg, per_query=True)
    for a, b in zip(batched, per_query):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget_images", [1, 5])
def test_rerank_in_image_chunks_equals_the_per_query_loop(tiny_inputs, monkeypatch, budget_images):
    model, images, ids, mask = tiny_inputs
    arch = model.arch
    per_image = arch.fusion_layers * (1 + (arch.image_res // arch.patch_size) ** 2) * 2 * arch.text_width
    monkeypatch.setattr(retrieval, "_KV_BUDGET", budget_images * per_image)  # chunks of 1 or 5 images
    cfg = EvalConfig(k_test=6, batch_size=64, rerank_batch=9)
    batched = retrieval_scores(model, images, ids, mask, cfg)
    per_query = retrieval_scores(model, images, ids, mask, cfg, per_query=True)
    for a, b in zip(batched, per_query):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_itm_scores_equal_fusing_each_pair_alone(tiny_inputs):
    model, images, ids, mask = tiny_inputs
    tokens, _ = embed_images(model, images, 64, torch.device("cpu"))
    hidden, _ = embed_texts(model, ids, mask, 64, torch.device("cpu"))
    img = torch.tensor([3, 3, 0, 7, 3, 11, 0])
    txt = torch.tensor([0, 5, 5, 35, 20, 1, 2])
    got = itm_scores(model, tokens, hidden, mask, img, txt, batch_size=4)
    with torch.no_grad():
        want = torch.stack([
            model.itm_logits(model.fuse(hidden[j : j + 1], mask[j : j + 1], tokens[i : i + 1]))[0, 1]
            for i, j in zip(img.tolist(), txt.tolist())
        ])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_itm_itc_adds_the_similarity_and_the_model_mode_is_restored(tiny_inputs):
    model, images, ids, mask = tiny_inputs
    model.train()
    itm = retrieval_scores(model, images, ids, mask, EvalConfig(k_test=3, score="itm"))
    both = retrieval_scores(model, images, ids, mask, EvalConfig(k_test=3, score="itm_itc"))
    assert model.training
    model.eval()
    sims = _sims(model, images, ids, mask)
    top = sims.topk(3, dim=1).indices
    torch.testing.assert_close(both[0].gather(1, top), itm[0].gather(1, top) + sims.gather(1, top))


def test_itc_score_is_the_similarity_matrix_and_never_fuses(tiny_inputs, monkeypatch):
    model, images, ids, mask = tiny_inputs
    model.eval()
    monkeypatch.setattr(model, "fuse", lambda *a, **k: pytest.fail("score=itc must not run the fusion encoder"))
    i2t, t2i = retrieval_scores(model, images, ids, mask, EvalConfig(k_test=3, score="itc"))
    sims = _sims(model, images, ids, mask)
    torch.testing.assert_close(i2t, sims)
    torch.testing.assert_close(t2i, sims.T)


def test_the_evaluation_package_imports_without_ray_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, albef_ray.eval, albef_ray.eval.checkpoint; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
