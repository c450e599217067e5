"""Grounding fine-tuning: the retrieval objective on (image, referring expression) pairs.

Weakly-supervised grounding never sees a box in training (ALBEF Sec. 5.5, official
``Grounding.py``): the model is fine-tuned on RefCOCO+'s image-text pairs with the retrieval
model's losses, ITC with image-id-aware targets (every expression of the same image is a
positive, over batch and queue) plus ITM with hard negatives never taken from the same image,
and momentum distillation of ITC. The boxes enter only at evaluation, where a Grad-CAM heat map
ranks the proposals (:mod:`albef_ray.eval.grounding`).

So the task is :class:`~albef_ray.objectives.retrieval.RetrievalTask` under its own registry
name: its rows' ``image_idx`` (a hash of ``(source, image_id)``) groups the expressions of one
image, as the official ``img_ids`` of the training file names do. The official checkpoint of
this task is the retrieval model's state dict (``idx_queue`` included), which the loader maps.
"""

from __future__ import annotations

from .retrieval import RetrievalTask


class GroundingTask(RetrievalTask):
    """Grounding fine-tuning (ITC + ITM, image-id-aware, MoD of ITC): :class:`RetrievalTask`.

    Args:
        model: the online ALBEF.
        cfg: the config tree (``itc``, ``itm``, ``mod``, ``momentum``, ``model``); the config
            checks guarantee ITC and ITM on and MLM off for ``task: grounding``.
        special: unused.
    """

    batch_keys = ("image_idx",)  # each expression's image index: the ITC positives and ITM exclusions
