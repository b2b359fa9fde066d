"""The offline pretraining recipe of the built-in tiny CLIP (`builtin:tiny-clip`).

Pretrained CLIP weights cannot be downloaded where this project is developed, so the
package ships a small CLIP-style model that this seeded recipe pretrains from scratch
on offline CIFAR-10 (``../shared/datasets``), together with the small CIFAR-10 subset
that the built-in default federates on. One run writes, under ``--out`` (default: the
package's ``assets/`` folder):

``cifar10-subset/``
    ``train.parquet`` (``--subset-train-per-class`` images per class of the CIFAR-10
    train split), ``test.parquet`` (``--subset-test-per-class`` per class of the test
    split), in the Hugging Face image layout with the ``huggingface`` schema metadata
    (``datasets`` reads the label as a ClassLabel with the class names), and
    ``SOURCE.json``: the selection rule, seed and source row indices.
``tiny-clip/``
    a ``transformers`` CLIPModel directory (``config.json``, ``model.safetensors``),
    its tokenizer and image processor, all loadable offline with ``from_pretrained``,
    and ``PRETRAIN.json``: arguments, seed, wall time, library versions, the rows used
    for pretraining and the zero-shot accuracies.

The recipe, step by step (everything random draws from ``--seed``):

1. Subset. For each class, the train (test) rows of that class are permuted with
   ``numpy.random.default_rng([seed, 1])`` (``[seed, 2]`` for test), classes in label
   order, and the first ``--subset-train-per-class`` (``--subset-test-per-class``)
   are kept.
2. Pretraining images. The train rows NOT in the subset are permuted with
   ``default_rng([seed, 3])`` and the first ``--pretrain-images`` are used, so the
   federated train subset is disjoint from every pretraining image by construction
   (checked again before writing).
3. Tokenizer. A lower-casing BPE (CLIP-style ``</w>`` word ends) learned by a small
   deterministic learner in this file on a word corpus of prompt templates and the
   CIFAR-10, CIFAR-100 and Caltech101 class names, with the letters, digits and
   common punctuation as base symbols: an unseen word falls apart into learned
   sub-words or letters, never into a single unknown token. Special tokens: ``<|pad|>``
   0, ``<|unk|>`` 1, ``<|startoftext|>`` 2, ``<|endoftext|>`` 3 (every text is wrapped
   in bos ... eos). The eos id is deliberately not 2: ``transformers`` treats
   ``eos_token_id == 2`` as the legacy "pool at the largest id" rule; any other id
   pools at the first eos position, which is what we want.
4. Model. A random ``CLIPModel`` (``torch.manual_seed(seed)``): ViT image tower (32 px,
   patch 4, width 128, 4 blocks, 4 heads, MLP 4x), causal text transformer (width
   128, 3 blocks, 4 heads, 32 positions), projection 128, learnable logit scale.
5. Loss: prompt classification. Per step, one prompt template is drawn from
   ``TRAIN_TEMPLATES``; the text tower encodes that template for the 10 class names;
   the loss is the cross-entropy of ``logit_scale * cos(image feature, text feature)``
   against the image labels. Both towers, the projections and the logit scale
   (clamped at 100) are trained. AdamW (weight decay 0.05 on matrices only), linear
   warm-up over the first 5% of steps, cosine decay to zero. Augmentation on the
   normalised tensors: random crop of the 4-pixel zero-padded image (zero is the mean
   colour after normalisation) and horizontal flip.
6. Preprocessing is the one ``preprocessor_config.json`` performs at load time:
   JPEG -> RGB -> (32x32, so resize and centre crop leave it unchanged) -> times
   1/255 in float64, cast to float32 -> (x - mean) / std in float32. After saving,
   the recipe reloads the directory with ``CLIPModel/AutoTokenizer/AutoImageProcessor
   .from_pretrained``, reads the written test subset with ``datasets`` and recomputes
   the zero-shot accuracy, which must agree with the recipe's own number.
7. Zero-shot accuracy with ``"a photo of a {}."`` on the full CIFAR-10 test split and
   on the shipped test subset.

Reproducibility: two runs with the same arguments (including ``--threads``) on the
same machine and library versions give identical weights.
"""

from fedlrm.tools.pretrain.data import (CIFAR10_NAMES, TEST_FILE, TRAIN_FILE, decode_indices, encode_indices,
                                        pretrain_indices, resolve_data_dir, to_pixel_values)
from fedlrm.tools.pretrain.model import build_image_processor
from fedlrm.tools.pretrain.recipe import add_arguments, main, run
from fedlrm.tools.pretrain.tokenizer import CALTECH101_NAMES, CIFAR100_NAMES, EVAL_TEMPLATE, build_tokenizer

__all__ = ["CALTECH101_NAMES", "CIFAR100_NAMES", "CIFAR10_NAMES", "EVAL_TEMPLATE", "TEST_FILE", "TRAIN_FILE",
           "add_arguments", "build_image_processor", "build_tokenizer", "decode_indices", "encode_indices", "main",
           "pretrain_indices", "resolve_data_dir", "run", "to_pixel_values"]
