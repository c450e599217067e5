"""The one typed config tree of albef-ray.

Every setting lives here once, with the paper's value as its default (ALBEF, Li et al. 2021,
and the official ``configs/Pretrain.yaml``). Experiment YAML files hold only what differs;
CLI overrides and Tune search spaces use the same dotted names (``optim.lr=2e-4``), and
:func:`flatten` gives those names for MLflow params.

Errors always name the dotted path of the offending field::

    ConfigError: optim.lr: Input should be a valid number ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file, override or combination of fields is invalid."""


class _Section(BaseModel):
    # Unknown keys are errors; assignment re-validates so overrides cannot smuggle bad types.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    size: str = Field("albef_base", description="Registered model size (albef_ray.model.registry).")
    image_res: int | None = Field(
        None, gt=0, description="Input resolution; None takes the size's default (256 for albef_base)."
    )
    vit_init: str | None = Field(
        "deit_base_patch16_224.fb_in1k",
        description="timm pretrained tag or a file of timm ViT weights; None keeps random init.",
    )
    bert_init: str | None = Field(
        "bert-base-uncased",
        description="Hugging Face BERT name or save_pretrained directory; None keeps random init.",
    )
    checkpoint: str | None = Field(
        None, description="albef-ray or released ALBEF checkpoint (.pth); loaded after the inits."
    )
    embed_dim: int = Field(256, gt=0, description="ITC projection width (paper: 256).")
    temp: float = Field(0.07, gt=0, description="Initial softmax temperature of ITC.")
    temp_min: float = Field(0.001, gt=0, description="Temperature is clamped to [temp_min, temp_max].")
    temp_max: float = Field(0.5, gt=0)
    text_dropout: float = Field(0.1, ge=0, lt=1, description="BERT hidden and attention dropout.")
    drop_path: float = Field(0.0, ge=0, lt=1, description="ViT stochastic depth (official: 0).")

    @model_validator(mode="after")
    def _check_temp(self) -> "ModelConfig":
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(f"temp={self.temp} outside [temp_min, temp_max]=[{self.temp_min}, {self.temp_max}]")
        return self


class MomentumConfig(_Section):
    momentum: float = Field(0.995, ge=0, le=1, description="EMA coefficient m: p_m = m p_m + (1-m) p.")
    queue_size: int = Field(65536, gt=0, description="Feature queue length K for ITC.")


class ITCConfig(_Section):
    enabled: bool = True
    weight: float = Field(1.0, ge=0)


class ITMConfig(_Section):
    enabled: bool = True
    hard_negatives: bool = Field(True, description="Sample negatives by ITC similarity; False = uniform.")
    hard_negatives_from_step: int = Field(
        0, ge=0,
        description="With hard_negatives: uniform negatives before this optimizer step, hard from it on. "
        "0 = the paper (hard from the start); a deviation for short runs, where ITM learns the easy "
        "pairs first (docs/results.md). Pretraining only.",
    )
    weight: float = Field(1.0, ge=0)


class MLMConfig(_Section):
    enabled: bool = True
    probability: float = Field(0.15, gt=0, lt=1, description="Fraction of (non-special) tokens masked.")
    mask_fraction: float = Field(0.8, ge=0, le=1, description="Of masked tokens: replaced by [MASK].")
    random_fraction: float = Field(0.1, ge=0, le=1, description="Of masked tokens: random token.")
    weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check_fractions(self) -> "MLMConfig":
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mask_fraction + random_fraction must be <= 1 (the rest keep the token)")
        return self


class MoDConfig(_Section):
    itc: bool = Field(True, description="Momentum-distilled ITC targets.")
    mlm: bool = Field(True, description="Momentum-distilled MLM targets.")
    alpha: float = Field(0.4, ge=0, le=1, description="Weight of the momentum targets.")
    alpha_warmup_epochs: float = Field(1.0, ge=0, description="alpha ramps linearly 0 -> alpha over this.")


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (paper: 1e-4).")
    min_lr: float = Field(1e-5, ge=0, description="Cosine decays to this (paper: 1e-5).")
    warmup_lr: float = Field(1e-5, ge=0, description="Warm-up starts here (official config).")
    warmup_steps: int = Field(2000, ge=0, description="Linear warm-up steps (official: 20 x 100 steps).")
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(None, gt=0, description="Max global grad norm; None = off (official).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="Per worker (paper: 64 x 8 GPUs = 512).")
    num_workers: int = Field(8, ge=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = True
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16 = autocast where supported.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (demos, tests).")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Needed for schedules when the data size is unknown up front."
    )
    log_every_steps: int = Field(50, ge=1)
    checkpoint_every_steps: int = Field(2000, ge=1, description="Also at every epoch end.")
    keep_checkpoints: int = Field(3, ge=1, description="Ray keeps the last K checkpoints.")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="This many non-finite steps in a row stop the run (last good checkpoint kept)."
    )
    cpus_per_worker: float = Field(
        4.0, gt=0, description="CPUs a train worker reserves; the rest of a node decodes data (Ray Data)."
    )


class RunSettings(_Section):
    """Where a run lives and how Ray treats it (the Ray edge reads this; the model never does)."""

    name: str | None = Field(None, description="Run folder name; None = '<config name>-<timestamp>'.")
    storage_path: str = Field("runs", description="Results root (local dir or cloud URI); made absolute.")
    address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local cluster.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the last checkpoint.")
    fail_at_step: int | None = Field(
        None, ge=1, description="TEST ONLY: rank 1 (or 0) dies once at this step (fault-injection tests)."
    )


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="MLflow URI; None = sqlite:///<storage_path>/mlflow.db. On a cluster: an MLflow server."
    )
    experiment: str = Field("albef-ray", description="MLflow experiment name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow tags (e.g. ablation name).")
    metric_prefix: str = Field(
        "", description="Prepended to every logged metric (a sweep's fine-tuning stage: 'retrieval/')."
    )


class DataConfig(_Section):
    """Caption shards and ALBEF's pretraining transform (official ``dataset/__init__.py``).

    The image resolution is not repeated here: it is ``model.image_res`` (or the size's), so
    the data and the ViT's position embeddings cannot disagree.
    """

    tokenizer: str = Field("bert-base-uncased", description="HF tokenizer name or directory.")
    max_text_len: int = Field(25, ge=4, description="Token limit (official pretrain: 25).")
    max_words: int = Field(30, ge=1, description="Caption cleaning word limit (official: 30).")
    append_sep: bool = Field(
        False, description="Captions as [CLS] text [SEP] (BERT's form); official ALBEF tokenises [CLS] text."
    )
    shards: list[str] = Field(
        default_factory=list, description="Dataset dirs or URIs, each holding <split>/part-*.parquet."
    )
    train_split: str = Field(
        "train", description="Split of data.shards to train on (e.g. a clean fine-tuning split)."
    )
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="RandomResizedCrop area fraction (official pretrain: 0.2-1.0)."
    )
    flip_prob: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability (torchvision default).")
    randaug_ops: int = Field(2, ge=0, description="RandAugment ops drawn per image (official: 2).")
    randaug_magnitude: int = Field(7, ge=0, le=10, description="RandAugment level out of 10 (official: 7).")
    jpeg_draft: bool = Field(
        True, description="Decode JPEGs at the smallest DCT scale that still covers the crop at full resolution."
    )
    map_batch_size: int = Field(
        256, ge=1, description="Rows per read block (consecutive rows of one file); the epoch order permutes blocks."
    )
    shuffle_buffer: int = Field(
        1024, ge=0, description="Rows permuted together: whole blocks, one decode task (0 = one block)."
    )
    normalize_on_device: bool = Field(
        True, description="Training on a GPU: images reach it as uint8 and are normalised there (same values)."
    )

    @model_validator(mode="after")
    def _check_crop_scale(self) -> "DataConfig":
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise _FieldError("data.crop_scale", f"need 0 < low <= high <= 1, got {self.crop_scale}")
        return self


class EvalConfig(_Section):
    """Image-text retrieval evaluation (official ``Retrieval.py`` ``evaluation()``).

    Every image and caption of the split is embedded, the ITC similarity matrix ranks all
    candidates, and each query's top ``k_test`` are re-scored with the fusion encoder's ITM head.
    """

    shards: list[str] = Field(
        default_factory=list, description="Dataset dirs holding the eval split; empty = data.shards."
    )
    split: str = Field("test", description="Split to evaluate (held-out: val or test).")
    k_test: int = Field(256, ge=1, description="Candidates re-ranked by ITM per query (COCO 256, Flickr30K 128).")
    score: Literal["itm", "itm_itc", "itc"] = Field(
        "itm",
        description="Re-rank score: ITM match logit (official ALBEF), ITM + ITC similarity, or itc: no re-rank.",
    )
    batch_size: int = Field(64, ge=1, description="Images or captions per embedding batch.")
    rerank_batch: int = Field(256, ge=1, description="(query, candidate) pairs per fusion-encoder batch.")
    max_images: int | None = Field(None, ge=1, description="Evaluate only the first N images (demos, sweeps).")
    every_epoch: bool = Field(True, description="Fine-tuning: evaluate after every epoch, keep the best.")


class NLVRConfig(_Section):
    """NLVR2 (official ``configs/NLVR.yaml``, ``model_nlvr.py``) and its text-assignment pre-step
    (``configs/NLVR_pretrain.yaml``, ``model_pretrain_nlvr.py``). Distillation uses ``mod.alpha``
    ramped over ``mod.alpha_warmup_epochs`` (official: 0.4 over the first epoch)."""

    distill: bool = Field(
        True, description="Momentum distillation on the logits: EMA encoders and head give soft targets (official: on)."
    )
    ta_temp: float = Field(
        0.07, gt=0, description="Text assignment: temperature of the image-image similarity the other images are drawn by."
    )


class VEConfig(_Section):
    """SNLI-VE (official ``configs/VE.yaml``, ``model_ve.py``): a 3-way classifier on the fusion
    [CLS]. Distillation uses ``mod.alpha`` ramped over ``mod.alpha_warmup_epochs`` (official:
    0.4 from the first step, ``warm_up: False``). The pretraining switches (``itc``, ``itm``,
    ``mlm``) do not apply to this task."""

    distill: bool = Field(
        True, description="Momentum distillation on the logits: EMA encoders and head give soft targets (official: on)."
    )


class GroundingConfig(_Section):
    """Weakly-supervised visual grounding (official ``Grounding.py``, ``configs/Grounding.yaml``):
    fine-tuned as retrieval is, on (image, referring expression) pairs, then evaluated by ranking
    each expression's proposal boxes with a Grad-CAM heat map (:mod:`albef_ray.eval.grounding`)."""

    variants: list[Literal["itm", "itc"]] = Field(
        ["itm", "itc"], min_length=1,
        description="Grad-CAM variants evaluated: itm (fusion cross-attention, ITM logit), itc (ViT [CLS] attention, ITC).",
    )
    score_variant: Literal["itm", "itc"] = Field(
        "itm", description="Variant whose eval.split accuracy is grounding_acc, the best-checkpoint score (official: itm)."
    )
    itm_layer: int | None = Field(
        None, description="Fusion layer (0-based) of ALBEF_itm; None: the paper's 3rd (official block_num 8), or the last-but-one of a shallower one."
    )
    itc_layer: int = Field(-1, description="ViT block (0-based, negative from the end) of ALBEF_itc (paper: the last).")
    box_alpha: float = Field(
        0.5, ge=0, description="A proposal scores sum(heat map inside it) / area**box_alpha (official alpha 0.5)."
    )
    iou_threshold: float = Field(0.5, gt=0, le=1, description="A pick is correct at IoU >= this with the referred box.")
    splits: list[str] = Field(
        ["val", "testA", "testB"], min_length=1, description="Splits `eval grounding` reports (RefCOCO+: val, testA, testB)."
    )
    max_refs: int | None = Field(None, ge=1, description="Evaluate only the first N expressions of a split (demos).")
    heatmaps: int = Field(
        4, ge=0, description="Expressions of eval.split whose Grad-CAM figures go to MLflow at each epoch evaluation."
    )

    @model_validator(mode="after")
    def _check_score_variant(self) -> "GroundingConfig":
        if self.score_variant not in self.variants:
            raise _FieldError("grounding.score_variant", f"{self.score_variant!r} is not in grounding.variants {self.variants}")
        return self


class VQAConfig(_Section):
    """VQA (official ``configs/VQA.yaml``, ``model_vqa.py``): an answer decoder on the fused
    question states, trained on annotator-weighted answers; evaluated by ranking a fixed answer
    list. Distillation uses ``mod.alpha`` ramped over ``mod.alpha_warmup_epochs`` (official: 0.4
    over the first epoch). The pretraining switches (``itc``, ``itm``, ``mlm``) do not apply."""

    distill: bool = Field(
        True, description="Momentum distillation: EMA encoders and decoder give soft answer-token targets (official: on)."
    )
    k_test: int = Field(
        128, ge=1, description="Answers scored in full per question: the k best by first-token probability (official 128)."
    )
    answer_list: str | None = Field(
        None, description="JSON list of candidate answers (official answer_list.json); None: <eval dataset>/answer_list.json."
    )
    max_answer_len: int = Field(
        10, ge=3, description="Token limit of a candidate answer, [CLS] and [SEP] included, when the answer list is tokenised."
    )
    accuracy: Literal["leave_one_out", "min3"] = Field(
        "leave_one_out",
        description="VQA accuracy: leave_one_out = official VQA eval (min(#humans/3, 1) averaged over the 10 choose 9 "
        "annotator subsets); min3 = min(#humans/3, 1).",
    )
    annotators: int = Field(
        10, ge=1, description="Human answers per question: an answer's count is round(weight x annotators) (VQA: 10)."
    )


class AlbefConfig(_Section):
    """Root of the config tree."""

    name: str = "albef"
    seed: int = 42
    task: str = Field(
        "pretrain",
        description="A task of albef_ray.tasks: pretrain (ITC+ITM+MLM on captions), retrieval "
        "(fine-tuning with image-id-aware ITC/ITM), ...",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    momentum: MomentumConfig = Field(default_factory=MomentumConfig)
    itc: ITCConfig = Field(default_factory=ITCConfig)
    itm: ITMConfig = Field(default_factory=ITMConfig)
    mlm: MLMConfig = Field(default_factory=MLMConfig)
    mod: MoDConfig = Field(default_factory=MoDConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    run: RunSettings = Field(default_factory=RunSettings)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    vqa: VQAConfig = Field(default_factory=VQAConfig)
    ve: VEConfig = Field(default_factory=VEConfig)
    nlvr: NLVRConfig = Field(default_factory=NLVRConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)

    @field_validator("task")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        from .tasks import TASKS  # plain data: no torch import

        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; registered: {', '.join(TASKS)}")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> "AlbefConfig":
        # Raised as (dotted path, message) so the error names the field to fix.
        if not (self.itc.enabled or self.itm.enabled or self.mlm.enabled):
            raise _FieldError("itc.enabled", "at least one of itc, itm, mlm must be enabled")
        if self.itm.enabled and self.itm.hard_negatives and not self.itc.enabled:
            raise _FieldError("itm.hard_negatives", "hard negatives are sampled from ITC similarities: enable itc")
        if self.itm.hard_negatives_from_step and self.task != "pretrain":
            raise _FieldError("itm.hard_negatives_from_step", f"a pretraining switch; task {self.task!r} takes 0")
        if self.mod.itc and not self.itc.enabled and self.mod.alpha > 0:
            raise _FieldError("mod.itc", "momentum distillation of ITC needs itc.enabled")
        if self.task in ("retrieval", "grounding"):  # official model_retrieval.py (Grounding.py too): ITC + ITM, no MLM
            if self.mlm.enabled:
                raise _FieldError("mlm.enabled", f"{self.task} fine-tuning has no MLM: set mlm.enabled=false")
            if not self.itc.enabled:
                raise _FieldError("itc.enabled", f"{self.task} fine-tuning needs ITC (image-id-aware targets)")
            if not self.itm.enabled:
                raise _FieldError("itm.enabled", f"{self.task} fine-tuning needs ITM: evaluation re-ranks with its head")
        if self.task == "nlvr_pretrain" and self.train.batch_size // self.optim.grad_accum < 2:
            raise _FieldError("train.batch_size", "text assignment pairs each image with another of its micro-batch: need >= 2")
        if self.mod.mlm and not self.mlm.enabled and self.mod.alpha > 0:
            raise _FieldError("mod.mlm", "momentum distillation of MLM needs mlm.enabled")
        from .model.registry import list_sizes  # the registry is plain data; no torch import cost here

        if self.model.size not in list_sizes():
            raise _FieldError("model.size", f"unknown size {self.model.size!r}; registered: {', '.join(list_sizes())}")
        if self.train.batch_size % self.optim.grad_accum:
            raise _FieldError(
                "optim.grad_accum",
                f"train.batch_size={self.train.batch_size} does not split into {self.optim.grad_accum} equal micro-batches",
            )
        global_batch = self.train.batch_size * self.train.num_workers
        if self.itc.enabled and self.momentum.queue_size % global_batch:
            raise _FieldError(
                "momentum.queue_size",
                f"{self.momentum.queue_size} is not divisible by the global batch "
                f"train.batch_size x train.num_workers = {global_batch}",
            )
        if self.optim.min_lr > self.optim.lr:
            raise _FieldError("optim.min_lr", f"{self.optim.min_lr} exceeds optim.lr={self.optim.lr}")
        return self

    @property
    def uses_momentum(self) -> bool:
        """Momentum encoders are needed for ITC's queue features or for distillation."""
        return self.itc.enabled or (self.mod.mlm and self.mod.alpha > 0)


class _FieldError(ValueError):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _FieldError):
            lines.append(f"{ctx_err.path}: {ctx_err.message}")
            continue
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{path}: {msg}")
    return "; ".join(lines)


def build_config(data: dict[str, Any] | None = None) -> AlbefConfig:
    """Validate a nested dict into an :class:`AlbefConfig`, naming bad fields by dotted path."""
    try:
        return AlbefConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML (``2e-4``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads "2e-4" as a string; accept it as a float like a user would expect.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``key='a.b'``; only known sections are walked into."""
    parts = key.split(".")
    node: Any = tree
    schema: Any = AlbefConfig
    for i, part in enumerate(parts[:-1]):
        field = schema.model_fields.get(part) if schema is not None else None
        if field is None:
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown key")
        annotation = field.annotation
        schema = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if schema is None:
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:  # `base: other.yaml` (relative to this file) is merged under this one
        data = merge(load_yaml(path.parent / base), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> AlbefConfig:
    """Defaults <- YAML file (only what differs) <- dotted overrides, validated once."""
    data = load_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return build_config(data)


def with_overrides(cfg: AlbefConfig, overrides: dict[str, Any]) -> AlbefConfig:
    """A new validated config with dotted ``overrides`` applied (used by sweeps)."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return build_config(data)


def flatten(cfg: AlbefConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-4, ...}``: the dotted names used for MLflow params and Tune spaces."""
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: AlbefConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
