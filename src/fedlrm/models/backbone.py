"""CLIP-style backbones behind one interface.

A backbone gives (1) normalised image features from an image encoder whose linear
layers can carry adapters, (2) normalised text features of prompts from a frozen text
encoder, (3) the logit scale and (4) the model's own image preprocessing. Backends:
Hugging Face `transformers` CLIP (hub id or local directory, including the project's
built-in dual encoder, a CLIP ViT beside a MiniLM text model) and `open_clip`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fedlrm.config import BUILTIN_MODEL, ModelConfig
from fedlrm.data.pretraining import PretrainedOn
from fedlrm.errors import ModelError


class Backbone(nn.Module):
    """The frozen CLIP parts a classifier needs. Subclasses fill in the backend."""

    #: the module whose linear layers are searched for adapter targets
    image_encoder: nn.Module
    logit_scale: torch.Tensor
    #: the images the backbone was pretrained on, where its folder records them (PRETRAIN.json):
    #: federations drop them from their train splits (data.exclude_pretraining)
    pretrained_on: PretrainedOn | None = None

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_text(prompts)

    def encode_text(self, prompts: list[str], context: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features of `prompts`, differentiable (for a text side that trains). With
        `context` (n_ctx, width), its vectors replace the token embeddings of the n_ctx words after
        the start token (CoOp's learnable context; see `fedlrm.adapters.prompts`)."""
        raise NotImplementedError

    def text_tower(self) -> list[nn.Module]:
        """The text encoder's modules: the first carries the linear layers a text-side LoRA adapts."""
        raise NotImplementedError

    def text_width(self) -> int:
        """The width of the text encoder's token embeddings (of a prompt context vector)."""
        raise NotImplementedError

    def text_target_modules(self, names: list[str]) -> list[str]:
        """`model.target_modules`, as the text encoder's layers are named (CLIP's own: unchanged)."""
        return list(names)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def prompt_tokens(self, prompts: list[str]) -> list[tuple[int, ...]] | None:
        """The token ids the text encoder sees for each prompt (None if unknown): prompts that
        tokenize alike embed alike, whatever the model."""
        return None

    def text_pooling_hint(self) -> str:
        """What decides which token's state becomes a prompt's feature, for error messages."""
        return ""

    def blocks(self) -> list[nn.Module] | None:
        """The image encoder's transformer blocks in order, if the backend can run them in two
        parts (`hidden_before` and `features_from`); None otherwise."""
        return None

    def stem(self) -> list[nn.Module]:
        """The modules that run before the first block (patch embedding, first norm), in order."""
        raise NotImplementedError

    def hidden_before(self, pixel_values: torch.Tensor, start: int) -> torch.Tensor:
        """The hidden states that enter block `start`: the stem, then blocks 0..start-1."""
        raise NotImplementedError

    def features_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Normalised image features from the hidden states entering block `start`."""
        raise NotImplementedError

    def token_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised features of every output token of the image encoder (batch, 1 + patches, d), the
        pooled token first, each through the final norm and the projection the pooled one takes
        (the local features FedOTP transports prompts to)."""
        raise ModelError(f"{type(self).__name__} cannot give the image encoder's patch features, which "
                         "this algorithm scores images by; use model.backend=hf")

    def token_features_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """`token_features` from the hidden states entering block `start`."""
        raise ModelError(f"{type(self).__name__} cannot give the image encoder's patch features; use model.backend=hf")

    def set_activation_checkpointing(self, enabled: bool) -> bool:
        """Recompute block activations in the backward pass; False if the backend cannot."""
        return False

    def activation_bytes(self, batch_size: int) -> int | None:
        """Rough fp32 bytes of activations a training step of the whole encoder keeps for the
        backward pass; None if unknown."""
        return None

    def text_modules(self) -> list[nn.Module]:
        """The text encoder's modules where they live outside this module tree (kept out so that they
        are neither adapted nor saved with client state); `freeze` must reach them all the same."""
        return []

    def freeze(self) -> "Backbone":
        """Every weight frozen and in evaluation mode, the text encoder's too: a text tower that kept
        requires_grad would have a prompt learner's backward compute a gradient for each of its
        weights at every step, though nothing updates them."""
        for module in (self, *self.text_modules()):
            module.requires_grad_(False)
            module.eval()
        return self


class HFClipBackbone(Backbone):
    """`transformers.CLIPModel`: ViT image tower, text tower and projections."""

    #: the transformers class the checkpoint loads with (peft's base model class in exports)
    hf_class = "CLIPModel"
    hf_module = "transformers.models.clip.modeling_clip"

    def __init__(self, model, tokenizer, image_processor):
        super().__init__()
        self.image_encoder = model.vision_model
        self.visual_projection = model.visual_projection
        # The text tower is used once per class set; keep it out of the module tree so it
        # is neither adapted nor saved with client state.
        self._text = (model.text_model, model.text_projection)
        self._tokenizer = tokenizer
        self._processor = image_processor
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone())

    def image_features(self, pixel_values):
        pooled = self.image_encoder(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def blocks(self):
        return list(self.image_encoder.encoder.layers)

    def stem(self):
        return [self.image_encoder.embeddings, self.image_encoder.pre_layrnorm]

    def hidden_before(self, pixel_values, start):
        # the same calls, in the same order, as CLIPVisionModel.forward and CLIPEncoder.forward
        hidden = pixel_values
        for module in self.stem():
            hidden = module(hidden)
        for block in self.blocks()[:start]:
            hidden = block(hidden, None)
        return hidden

    def features_from(self, hidden, start):
        for block in self.blocks()[start:]:
            hidden = block(hidden, None)
        pooled = self.image_encoder.post_layernorm(hidden[:, 0, :])
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def token_features(self, pixel_values):
        return self._projected_tokens(self.image_encoder(pixel_values=pixel_values).last_hidden_state)

    def token_features_from(self, hidden, start):
        for block in self.blocks()[start:]:
            hidden = block(hidden, None)
        return self._projected_tokens(hidden)

    def _projected_tokens(self, hidden):
        # as the pooled token: post_layernorm, then the projection (OpenAI CLIP's ln_post and proj)
        return F.normalize(self.visual_projection(self.image_encoder.post_layernorm(hidden)), dim=-1)

    def activation_bytes(self, batch_size):
        c = self.image_encoder.config
        tokens = (c.image_size // c.patch_size) ** 2 + 1
        # per token and block: layer-norm, q/k/v, attention and MLP outputs (about 13 widths
        # of hidden plus 4 of the MLP's) and one row of attention probabilities per head
        per_token = 13 * c.hidden_size + c.intermediate_size + c.num_attention_heads * tokens
        return 4 * per_token * tokens * c.num_hidden_layers * batch_size

    def set_activation_checkpointing(self, enabled):
        if enabled:
            # non-reentrant: the blocks' inputs need not require grad (the encoder is frozen)
            self.image_encoder.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.image_encoder.activation_checkpointing_disable()
        return True

    def encode_text(self, prompts, context=None):
        text_model, projection = self._text
        tokens = self._tokenizer(prompts, padding=True, return_tensors="pt")
        device = projection.weight.device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with _context_in(self._token_embedding(), ids, context, self._tokenizer):
            pooled = self._pooled(ids, mask)
        return F.normalize(projection(pooled), dim=-1)

    def _token_embedding(self) -> nn.Embedding:
        return self._text[0].embeddings.token_embedding

    def _pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A prompt's text-model output before the projection (CLIP: the end-of-text token's state)."""
        return self._text[0](input_ids=ids, attention_mask=mask).pooler_output

    def text_tower(self):
        return list(self._text)

    def text_modules(self):
        return list(self._text)

    def text_width(self):
        return self._token_embedding().embedding_dim

    def preprocess(self, images):
        return self._processor(images=images, return_tensors="pt")["pixel_values"].float()

    def prompt_tokens(self, prompts):
        return [tuple(ids) for ids in self._tokenizer(prompts)["input_ids"]]

    def text_pooling_hint(self):
        text_model, _ = self._text
        tok = self._tokenizer
        pooled_at = getattr(text_model, "eos_token_id", None)
        return (f"transformers pools each prompt at the first position of the model's text_config.eos_token_id "
                f"(or, when that id is 2, at the largest token id); here the model's text_config.eos_token_id is "
                f"{pooled_at}, while its tokenizer's eos_token_id is {tok.eos_token_id} and pad_token_id is "
                f"{tok.pad_token_id}. If they differ, set \"eos_token_id\": {tok.eos_token_id} in the "
                f"\"text_config\" of the checkpoint's config.json (or use the tokenizer saved with the model)")


def pooled_text(text_model, ids: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """A BERT-style text model's output for the prompts `ids` before any projection: its pooler
    output (`pooling="pooler"`) or the attention-masked mean of its last hidden states ("mean", as
    sentence-transformers pools). The dual-encoder backbone and the built-in model's recipe both
    pool through here, so the recipe trains on exactly the text features the backbone computes."""
    out = text_model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    if pooling == "pooler":
        return out.pooler_output
    weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1)


class HFDualEncoderBackbone(HFClipBackbone):
    """`transformers.VisionTextDualEncoderModel` with CLIP's ViT as its image tower and a BERT-style
    text encoder (e.g. the sentence-transformers MiniLM the built-in model uses). The image side is
    CLIP's, module for module; the text side reads the text model's own tokenizer, and pools a
    prompt as the checkpoint's config says: `text_pooling: mean` (the attention-masked mean of the
    last hidden states, as sentence-transformers pools) or, by default, the text model's pooler
    output (what `VisionTextDualEncoderModel.get_text_features` uses)."""

    hf_class = "VisionTextDualEncoderModel"
    hf_module = "transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder"
    #: CLIP's attention projection names -> a BERT layer's (text-encoder LoRA, model.target_modules)
    TEXT_MODULES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}

    def __init__(self, model, tokenizer, image_processor):
        from transformers import CLIPVisionModel

        if not isinstance(model.vision_model, CLIPVisionModel):  # what CLIPModel.vision_model is
            raise ModelError(f"the dual encoder's image tower is a {type(model.vision_model).__name__}; fedlrm "
                             "adapts CLIP's vision transformer only (vision_config of model_type clip_vision_model)")
        super().__init__(model, tokenizer, image_processor)
        self.text_pooling = getattr(model.config, "text_pooling", "pooler")
        if self.text_pooling not in ("mean", "pooler"):
            raise ModelError(f"the checkpoint's config says text_pooling={self.text_pooling!r}; use mean or pooler")

    def _token_embedding(self):
        return self._text[0].embeddings.word_embeddings

    def _pooled(self, ids, mask):
        return pooled_text(self._text[0], ids, mask, self.text_pooling)

    def text_target_modules(self, names):
        return [self.TEXT_MODULES.get(n, n) for n in names]

    def text_pooling_hint(self):
        return (f"the dual encoder pools each prompt by its text model's {'mean over tokens' if self.text_pooling == 'mean' else 'pooler output'} "
                f"(text_pooling={self.text_pooling!r} in the checkpoint's config.json); check that the tokenizer is the "
                "text model's own and that the text model's weights were loaded")


class OpenClipBackbone(Backbone):
    """`open_clip` models (optional extra: needs torchvision)."""

    def __init__(self, model, tokenizer, transform):
        super().__init__()
        from fedlrm.models.attention import split_attention

        split_attention(model.visual)  # q/k/v as separate linears, so q_proj/v_proj can be adapted
        self.image_encoder = model.visual
        self._text = model
        self._tokenizer = tokenizer
        self._transform = transform
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone())

    def image_features(self, pixel_values):
        return F.normalize(self.image_encoder(pixel_values), dim=-1)

    def set_activation_checkpointing(self, enabled):
        if not hasattr(self.image_encoder, "set_grad_checkpointing"):
            return False
        self.image_encoder.set_grad_checkpointing(enabled)
        return True

    def encode_text(self, prompts, context=None):
        ids = self._tokenizer(prompts).to(self.logit_scale.device)
        with _context_in(self._text.token_embedding, ids, context, None):
            return F.normalize(self._text.encode_text(ids), dim=-1)

    def text_modules(self):
        return [self._text]  # the whole open_clip model; its image tower is image_encoder, frozen already

    def text_tower(self):
        raise ModelError("LoRA on the text encoder (model.adapt_encoders with text) needs model.backend=hf: "
                         "open_clip's text attention has no separate q/v projections to adapt")

    def text_width(self):
        return self._text.token_embedding.embedding_dim

    def preprocess(self, images):
        return torch.stack([self._transform(im) for im in images])

    def prompt_tokens(self, prompts):
        return [tuple(ids) for ids in self._tokenizer(prompts).tolist()]

    def text_pooling_hint(self):
        return ("open_clip pools each prompt at its end-of-text token; check that model.name and "
                "model.pretrained belong together and that the tokenizer is the model's")


@contextmanager
def _context_in(embedding: nn.Embedding, ids: torch.Tensor, context: torch.Tensor | None,
                tokenizer) -> Iterator[None]:
    """Within the block, the embedding's output at positions 1..n_ctx is `context`: (n_ctx, width) for
    every prompt, or (prompts, n_ctx, width), one per prompt. The prompts must hold n_ctx placeholder
    words right after the start token, each one token."""
    if context is None:
        yield
        return
    n = context.shape[-2]
    placeholders = ids[:, 1:1 + n]
    if ids.shape[1] < n + 2 or not bool((placeholders == placeholders[:1, :1]).all()):
        from fedlrm.adapters.prompts import PLACEHOLDER

        raise ModelError(f"the prompts do not start with {n} placeholder tokens (the word {PLACEHOLDER!r} "
                         f"{n} times) after the start token, so the {n} context vectors have no positions "
                         f"to take; the tokenizer splits {PLACEHOLDER!r} into several tokens or drops it")

    def put(module, inputs, output):
        out = output.clone()
        out[:, 1:1 + n] = context.to(out.dtype)
        return out

    handle = embedding.register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def resolve_name(name: str) -> str:
    """A model name as transformers loads it: the built-in model's joined folder (made on first
    use, see fedlrm.models.builtin), else the name as given."""
    if name == BUILTIN_MODEL:
        from fedlrm.models.builtin import builtin_model_dir

        return str(builtin_model_dir())
    return name


def load_backbone(cfg: ModelConfig) -> Backbone:
    """Load the configured backbone, frozen, in eval mode."""
    if cfg.backend == "hf":
        return _load_hf(resolve_name(cfg.name)).freeze()
    if cfg.backend == "open_clip":
        return _load_open_clip(cfg.name, cfg.pretrained).freeze()
    raise ModelError(f"unknown model.backend {cfg.backend!r}; use hf or open_clip")


def hf_model_class(name: str):
    """The transformers class a CLIP-style checkpoint loads with: `VisionTextDualEncoderModel` for a
    dual encoder (config model_type vision-text-dual-encoder), `CLIPModel` otherwise."""
    from transformers import AutoConfig, CLIPModel, VisionTextDualEncoderModel

    model_type = AutoConfig.from_pretrained(name).model_type
    return VisionTextDualEncoderModel if model_type == "vision-text-dual-encoder" else CLIPModel


def _load_hf(name: str) -> HFClipBackbone:
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError(f"model.name {name!r} looks like a local path but is not a directory")
    where = str(Path(name).expanduser()) if looks_local else name
    try:
        with quiet_transformers():  # the PIL-fallback notice for image processors is noise here
            model_class = hf_model_class(where)
            model = model_class.from_pretrained(where)
            tokenizer = AutoTokenizer.from_pretrained(where)
            processor = AutoImageProcessor.from_pretrained(where)
    except OSError as err:
        raise ModelError(
            f"could not load the CLIP model {name!r} with transformers: {str(err).splitlines()[0]}. "
            "Give a local directory saved with save_pretrained, or a hub id on a machine with network access."
        ) from err
    backbone = (HFDualEncoderBackbone if model_class is VisionTextDualEncoderModel else HFClipBackbone)(
        model, tokenizer, processor)
    if looks_local:  # a folder made by a recipe that records its pretraining images
        backbone.pretrained_on = PretrainedOn.read(Path(where))
    return backbone


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' notices and progress bars off for a block, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _load_open_clip(name: str, pretrained: str | None) -> OpenClipBackbone:
    try:
        import open_clip
    except ImportError as err:
        raise ModelError(
            "model.backend=open_clip needs the optional extra: pip install 'fedlrm[open_clip]' "
            f"(with a torch build that torchvision supports). Import failed: {err}"
        ) from err
    try:
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as err:  # open_clip raises RuntimeError/ValueError/HF errors alike
        raise ModelError(f"could not create open_clip model {name!r} (pretrained={pretrained!r}): {err}") from err
    return OpenClipBackbone(model, open_clip.get_tokenizer(name), transform)


class ClipClassifier(nn.Module):
    """Zero-shot style classifier: logit_scale * cos(image feature, class text feature).

    The class text features are computed once from the frozen text tower and kept as a
    buffer (paper eqs. 2-4); only adapters inside the image encoder train.
    """

    def __init__(self, backbone: Backbone, class_names: list[str], prompt: str = "a photo of a {}."):
        super().__init__()
        self.backbone = backbone
        self.class_names = list(class_names)
        self.prompt = prompt
        prompts = [prompt.format(c) for c in class_names]
        self.register_buffer("text_features", backbone.text_features(prompts))
        check_text_features(backbone, self.class_names, prompts, self.text_features)
        self._classes: torch.Tensor | None = None  # rows of text_features in the logits; None: all
        # A text side that trains (text-encoder LoRA, a prompt context): class features are computed
        # in every forward pass from the current weights instead of read from the buffer above.
        self.text_encoder: nn.ModuleList | None = None
        self.prompt_context = None
        self._text_cache: dict[str | None, tuple] = {}  # role -> (key, the tensors it names, features)

    def live_text(self, tower: bool, context: nn.Module | None) -> None:
        """Compute class text features in every forward pass: with the text tower in this module (so
        adapters on it train and move with the model) and/or a prompt context; neither: cached."""
        self.text_encoder = nn.ModuleList(self.backbone.text_tower()) if tower or context is not None else None
        self.prompt_context = context
        self._text_cache = {}

    def train(self, mode: bool = True) -> "ClipClassifier":
        """As `nn.Module.train`, except that a tower with nothing to train stays in evaluation mode.
        A frozen text encoder's dropout (all-MiniLM-L6-v2 has 0.1) would make a prompt learner's class
        features random at every step, which CoOp's frozen CLIP (no dropout) never makes them, and the
        built-in recipe fit its projection to the dropout-free output."""
        super().train(mode)
        if mode:
            for tower in (self.backbone.image_encoder, *(self.text_encoder or ())):
                if not any(p.requires_grad for p in tower.parameters()):
                    tower.eval()
        return self

    @property
    def text_trains(self) -> bool:
        return self.text_encoder is not None

    def class_text_features(self) -> torch.Tensor:
        """The text features of the classes the logits are over (see `classifying_over`)."""
        if not self.text_trains:
            return self.text_features if self._classes is None else self.text_features[self._classes]
        context = self.prompt_context
        if context is None:
            return self._encoded([None])[0]
        return self._encoded([context.only or context.active])[0]

    def role_text_features(self) -> torch.Tensor:
        """The class text features under each role of the prompt context in use, (roles, classes, d),
        from one pass of the text encoder over every (role, class) prompt that is not cached."""
        return self._encoded(list(self.prompt_context.roles_in_use()))

    def _encoded(self, roles: list[str | None]) -> torch.Tensor:
        """(roles, classes, d): each role's class features (None: the plain prompt, no context), the
        ones whose inputs have not changed since they were last computed read from the cache (e.g.
        pFedMoAP's received experts, fixed for a round: 3 of its 4 roles; every role in evaluation)."""
        names = self._names()
        tower = [p for module in self.text_encoder for p in module.parameters()]
        dropout = any(module.training for module in self.text_encoder)
        keys = {role: None if dropout else self._text_key(role, names, tower) for role in roles}
        missing = [r for r in roles if keys[r] is None or self._text_cache.get(r, (None,))[0] != keys[r][0]]
        fresh: dict[str | None, torch.Tensor] = {}
        if missing:
            context = self.prompt_context
            template = context.template if context is not None else self.prompt.format
            prompts = [template(n) for n in names]
            if context is None:
                computed = self.backbone.encode_text(prompts).unsqueeze(0)
            else:
                vectors = torch.stack([context.vectors(r) for r in missing])  # (roles, n_ctx, width)
                computed = self.backbone.encode_text(prompts * len(missing), vectors.repeat_interleave(
                    len(prompts), dim=0)).view(len(missing), len(prompts), -1)
            for role, features in zip(missing, computed):
                fresh[role] = features
                if keys[role] is not None:
                    self._text_cache[role] = (*keys[role], features.detach())
        return torch.stack([fresh[r] if r in fresh else self._text_cache[r][2] for r in roles])

    def _text_key(self, role: str | None, names: list[str],
                  tower: list[torch.Tensor]) -> tuple[tuple, list[torch.Tensor]] | None:
        """What a role's class features depend on (and the tensors it names), or None where a gradient
        is wanted through them and they must be computed afresh. The version counters change with
        every in-place write (an optimiser step, `set_state`); the cache holds the tensors themselves,
        so that no other tensor takes their ids."""
        watched = tower if role is None else [self.prompt_context.vectors(role), *tower]
        if torch.is_grad_enabled() and any(t.requires_grad for t in watched):
            return None
        key = (tuple(names), torch.is_autocast_enabled(self.text_features.device.type),
               tuple(id(t) for t in watched), tuple(t._version for t in watched))
        return key, watched

    def _names(self) -> list[str]:
        return self.class_names if self._classes is None else [self.class_names[i] for i in self._classes.tolist()]

    @property
    def role_scoring(self) -> str | None:
        """How the prompt context scores images from every role's class features (`PromptContext.score`):
        by their "patches" (FedOTP) or "pooled" feature (pFedMoAP); None: plain cosine logits."""
        return None if self.prompt_context is None else self.prompt_context.scores_by_role

    @contextmanager
    def classifying_over(self, classes: list[int] | None) -> Iterator[None]:
        """Logits over `classes` only (positions in `class_names`, in that order) within the block:
        a client of several sharing one model in process, with classes of its own. None: all."""
        before = self._classes
        self._classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long,
                                                                       device=self.text_features.device)
        try:
            yield
        finally:
            self._classes = before

    @property
    def image_encoder(self) -> nn.Module:
        return self.backbone.image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.role_scoring == "patches":  # every output token but the pooled one, which comes first
            return self.role_logits(self.backbone.token_features(pixel_values)[:, 1:])
        features = self.backbone.image_features(pixel_values)
        return self.role_logits(features) if self.role_scoring else self.logits(features)

    def forward_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the hidden states entering block `start` (see `Backbone.hidden_before`)."""
        if self.role_scoring == "patches":
            return self.role_logits(self.backbone.token_features_from(hidden, start)[:, 1:])
        features = self.backbone.features_from(hidden, start)
        return self.role_logits(features) if self.role_scoring else self.logits(features)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.logit_scale * features @ self.class_text_features().t()

    def role_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits the prompt context gives from image features and every role's class features."""
        text = self.role_text_features().to(image.dtype)
        return self.backbone.logit_scale * self.prompt_context.score(image, text)

    @property
    def preprocess(self) -> Callable[[list[Image.Image]], torch.Tensor]:
        return self.backbone.preprocess


#: text features of different prompts closer than this are the same computation, not a model's
#: judgement: a real text tower, even a tiny one, keeps distinct token sequences further apart
#: (the tiny CLIP of earlier versions put "a photo of a class 0." and "... class 1." at 0.99996)
SAME_FEATURE_COSINE = 1 - 1e-6


def check_text_features(backbone: Backbone, class_names: list[str], prompts: list[str],
                        features: torch.Tensor) -> None:
    """Refuse class text features that are all the same although the prompts differ: every
    logit would be equal, and a run would train nothing (every loss ln K) and still end with
    success. The usual cause is a checkpoint whose text pooling reads the same token of every
    prompt (a text_config.eos_token_id that does not match the tokenizer's)."""
    tokens = backbone.prompt_tokens(prompts) or prompts
    first: dict[object, int] = {}
    for i, key in enumerate(tokens):
        first.setdefault(key, i)  # classes whose prompts tokenize alike are duplicates the user made
    distinct = sorted(first.values())
    if len(distinct) < 2:
        return
    f = features[distinct].double()
    finite = bool(torch.isfinite(f).all())
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = f @ f.t()
    others = ~torch.eye(len(distinct), dtype=torch.bool)
    if finite and cos[others].min() <= SAME_FEATURE_COSINE:
        return
    hint = backbone.text_pooling_hint()
    what = (f"the same feature (e.g. {prompts[distinct[0]]!r} and {prompts[distinct[1]]!r}: cosine similarity "
            f"{float(cos[0, 1]):.7f})" if finite else "features that are not finite numbers")
    raise ModelError(
        f"the text encoder gives all {len(distinct)} distinct class prompts {what}, so the classifier cannot "
        f"tell one class from another and training would learn nothing. The checkpoint's text pooling "
        f"probably reads the same token of every prompt" + (f": {hint}" if hint else "")
        + ". Fix the checkpoint, or use another model.name")


def check_fits(backbone: Backbone, cfg: ModelConfig, rank: int) -> None:
    """Refuse `model.target_layers` beyond the image encoder's blocks and an `adapter.rank`
    wider than an adapted layer, once the backbone is loaded and before anything is built."""
    from fedlrm.adapters.inject import encoder_depth, target_linears
    from fedlrm.errors import ConfigError

    depth = encoder_depth(backbone.image_encoder)
    if cfg.target_layers and depth > 0:
        outside = [i for i in cfg.target_layers if not -depth <= i < depth]
        if outside:
            raise ConfigError(
                f"model.target_layers={list(cfg.target_layers)} names block(s) {outside} that {cfg.name} does not "
                f"have: its image encoder has {depth} blocks, 0..{depth - 1} (or -1..-{depth} from the top)")
    targets = target_linears(backbone.image_encoder, cfg.target_modules, cfg.target_layers)
    too_narrow = [(n, m) for n, m in targets if rank > min(m.in_features, m.out_features)]
    if too_narrow:
        name, m = too_narrow[0]
        widest = min(min(t.in_features, t.out_features) for _, t in targets)
        raise ConfigError(
            f"adapter.rank={rank} is wider than the adapted layer {name} ({m.in_features} -> {m.out_features}): a "
            f"LoRA's rank is at most min(d_in, d_out) = {min(m.in_features, m.out_features)}; use adapter.rank at "
            f"most {widest} with model.target_modules={list(cfg.target_modules)}")
