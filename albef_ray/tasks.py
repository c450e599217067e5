"""The task registry: the one place that lists ALBEF's tasks (torchtitan's "train spec").

A task is what ``cfg.task`` names: the objective module that trains it (a ``nn.Module`` built
as ``Task(model, cfg, special)`` returning ``loss`` and ``*_loss`` keys), the evaluation its
fine-tuning runs at epoch ends (rank 0, plain PyTorch) with the metric Ray keeps the best
checkpoints by, the evaluation a sweep stage reports after training it, and that stage's
headline table columns. The launcher, checkpointing, sweeps and MLflow code ask this registry
and never name a task.

Entries name their classes and functions as ``"module:attribute"`` and load them on use, so
this module (and the config checks that consult it) import no torch.

Adding a task: one objective module (``objectives/<task>.py``), a head if it needs one
(``model/``), a data source, a config section, ``experiments/finetune_<task>.yaml``, one CLI
module (``cli/<task>.py``), and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .config import AlbefConfig


def _load(ref: str) -> Any:
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class TaskSpec:
    """How one task trains, evaluates and reports.

    Attributes:
        name: the ``cfg.task`` value.
        objective: ``"module:Class"`` of the task module: ``Class(model, cfg, special)``.
        evaluation: ``"module:function"``: ``function(cfg, checkpoint) -> metrics`` on
            ``eval.split``, what a sweep stage reports after training this task.
        columns: the stage's headline columns, ``(metric key, header)``.
        epoch_evaluator: ``"module:Class"`` run by rank 0 at epoch ends during training,
            ``Class(cfg, device, tracker)(task, step, run=True) -> metrics``; None: none.
        score: the metric (higher is better) by which Ray keeps the best checkpoints when
            the epoch evaluator runs; None: Ray keeps the latest.
        synth: ``"module:function"`` writing the task's embedded version (``albef-ray data
            synth-task NAME OUT``): ``function(out, settings: SynthTaskSettings) -> manifest``;
            None: the task has none.
    """

    name: str
    objective: str
    evaluation: str
    columns: tuple[tuple[str, str], ...]
    epoch_evaluator: str | None = None
    score: str | None = None
    synth: str | None = None

    def task_class(self) -> type[nn.Module]:
        return _load(self.objective)

    def evaluate(self) -> Callable[[AlbefConfig, str], dict[str, float]]:
        return _load(self.evaluation)

    def evaluates_every_epoch(self, cfg: AlbefConfig) -> bool:
        return self.epoch_evaluator is not None and cfg.eval.every_epoch

    def make_epoch_evaluator(self, cfg: AlbefConfig, device=None, tracker=None):
        """The epoch-end evaluator, or None when the task has none or ``eval.every_epoch`` is off."""
        return _load(self.epoch_evaluator)(cfg, device, tracker) if self.evaluates_every_epoch(cfg) else None


    def synth_builder(self) -> Callable[..., dict]:
        if self.synth is None:
            raise KeyError(f"task {self.name!r} has no embedded version; with one: "
                           f"{', '.join(n for n, t in TASKS.items() if t.synth)}")
        return _load(self.synth)


_RECALLS = (("txt_r_mean", "TR"), ("img_r_mean", "IR"))  # the paper's Table 1: mean of R@1/5/10

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "pretrain", "albef_ray.objectives.pretrain:PretrainTask", "albef_ray.eval.stage:pretrained_metrics",
            columns=(*_RECALLS, ("itm_acc", "ITM acc")),
        ),
        TaskSpec(
            "retrieval", "albef_ray.objectives.retrieval:RetrievalTask", "albef_ray.eval.stage:retrieval_metrics",
            columns=_RECALLS, epoch_evaluator="albef_ray.eval.epoch:RetrievalEvaluator", score="r_mean",
        ),
        TaskSpec(
            "nlvr", "albef_ray.objectives.nlvr:NLVRTask", "albef_ray.eval.nlvr:nlvr_metrics",
            columns=(("nlvr_acc", "NLVR2 acc"),), epoch_evaluator="albef_ray.eval.nlvr:NLVREvaluator",
            score="nlvr_acc", synth="albef_ray.synth.nlvr:build_nlvr",
        ),
        TaskSpec(  # NLVR2's text-assignment pre-step on caption data; its checkpoint starts `nlvr`
            "nlvr_pretrain", "albef_ray.objectives.nlvr:TextAssignmentTask", "albef_ray.eval.nlvr:ta_metrics",
            columns=(("ta_acc", "TA acc"),),
        ),
        TaskSpec(
            "ve", "albef_ray.objectives.ve:VETask", "albef_ray.eval.ve:ve_metrics",
            columns=(("ve_acc", "SNLI-VE acc"),), epoch_evaluator="albef_ray.eval.ve:VEEvaluator", score="ve_acc",
            synth="albef_ray.synth.ve:build_ve",
        ),
        TaskSpec(  # fine-tuned as retrieval; evaluated by Grad-CAM ranking of proposal boxes
            "grounding", "albef_ray.objectives.grounding:GroundingTask", "albef_ray.eval.grounding:grounding_metrics",
            columns=(("grounding_acc", "Grounding acc"),), epoch_evaluator="albef_ray.eval.grounding:GroundingEvaluator",
            score="grounding_acc", synth="albef_ray.synth.grounding:build_grounding",
        ),
        TaskSpec(
            "vqa", "albef_ray.objectives.vqa:VQATask", "albef_ray.eval.vqa:vqa_metrics",
            columns=(("vqa_acc", "VQA acc"),), epoch_evaluator="albef_ray.eval.vqa:VQAEvaluator", score="vqa_acc",
            synth="albef_ray.synth.vqa:build_vqa",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``.

    Raises:
        KeyError: naming the registered tasks.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(TASKS)}")
    return TASKS[name]


def build_task(cfg: AlbefConfig, special=None) -> nn.Module:
    """The model of ``cfg.model`` (initial weights loaded per config) in the task ``cfg.task`` names.

    ``model.checkpoint``, when set, is loaded into the whole task (online model, momentum
    encoder and queues where the checkpoint has them).
    """
    import logging

    from .model.loading import build_model_from_config, load_albef_checkpoint
    from .objectives.mlm import SpecialTokens

    task = get_task(cfg.task).task_class()(build_model_from_config(cfg), cfg, special or SpecialTokens())
    if cfg.model.checkpoint:
        logging.getLogger(__name__).info("%s", load_albef_checkpoint(task, cfg.model.checkpoint))
    return task
