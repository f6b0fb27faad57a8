"""Semantic segmentation: data, on-device augmentation, DeepLabv3 models, loss, mIoU and PGD.

Conventions, shared by every module here:

- Masks hold class ids with 255 = ignore (Stanford's unknown -1, VOC's void borders, padding);
  ignored pixels count in neither the loss, the metrics nor the attacks' objective.
- Splits are uint8 tensors at a fixed square size (320 for Stanford Background, 512 for VOC2012
  by default; `size` scales larger images down to fit and pads the rest, see `data`).
- Stanford Background has no official split: a fixed seeded 80/20 split of the sorted image
  names (572 train / 143 test of 715), see `stanford_split`. VOC2012: train (1464) / val (1449).
- mIoU comes from one confusion matrix over the whole split; a class absent from both the
  targets and the predictions does not count in the mean.
- Models take images in [0, 1] (Normalize is their first layer) and return logits [N, C, H, W].

`samat.segmentation.task` (imported by `samat.tasks.get("segmentation")`, not here) puts these
together for samat's run loop: build, training loader, resumable mIoU evaluation under PGD.
"""

from samat.segmentation.attacks import (
    SegAttack,
    batch_confusion,
    eval_mode,
    evaluate_segmentation,
    pgd_segmentation,
)
from samat.segmentation.data import (
    DEFAULT_SIZES,
    SegDataset,
    SegSplit,
    load_segmentation,
    load_stanford_background,
    load_voc2012,
    stanford_split,
)
from samat.segmentation.generate import generate_stanford, generate_voc
from samat.segmentation.loader import SegLoader, augment
from samat.segmentation.loss import IGNORE_INDEX, pixel_cross_entropy, segmentation_loss
from samat.segmentation.metrics import class_iou, confusion_matrix, miou, pixel_accuracy
from samat.segmentation.models import SEG_MODELS, create_model

__all__ = [
    "DEFAULT_SIZES",
    "IGNORE_INDEX",
    "SEG_MODELS",
    "SegAttack",
    "SegDataset",
    "SegLoader",
    "SegSplit",
    "augment",
    "batch_confusion",
    "class_iou",
    "confusion_matrix",
    "create_model",
    "eval_mode",
    "evaluate_segmentation",
    "generate_stanford",
    "generate_voc",
    "load_segmentation",
    "load_stanford_background",
    "load_voc2012",
    "miou",
    "pgd_segmentation",
    "pixel_accuracy",
    "pixel_cross_entropy",
    "segmentation_loss",
    "stanford_split",
]
