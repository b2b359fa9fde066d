"""The recipe's text side: prompt templates and a small BPE tokenizer learned from them and
from class names (the backbone issue replaces it with a pretrained language model's)."""

from __future__ import annotations

from collections import Counter

from fedlrm.tools.pretrain.data import CIFAR10_NAMES

MAX_TEXT_LENGTH = 32
PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0, 1, 2, 3
EVAL_TEMPLATE = "a photo of a {}."
TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a pixelated photo of the {}.",
    "a good photo of the {}.",
    "itap of a {}.",
]
# Extra templates (the CLIP ImageNet prompt set) that only feed the tokenizer's corpus.
CORPUS_TEMPLATES = TRAIN_TEMPLATES + [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a jpeg corrupted photo of a {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "the origami {}.", "a sketch of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of a large {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a cartoon {}.",
    "art of a {}.", "a plushie {}.", "a photo of the small {}.", "this is a photo of an {}.",
    "a centered satellite photo of {}.", "a photo of a {}, a type of animal.", "a photo of a {}, a type of pet.",
    "a photo of a {}, a type of flower.", "a photo of a {}, a type of food.", "a photo of a {}, a type of aircraft.",
    "a photo of a {}, a type of vehicle.", "a photo of a {} texture.", "a photo of a person doing {}.",
]
# Copied from the `huggingface` metadata of ../shared/datasets/caltech101-train.parquet, so
# that the tokenizer does not depend on which files a data directory happens to hold.
CALTECH101_NAMES = [
    "BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor",
    "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly",
    "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body",
    "cougar_face", "crab", "crayfish", "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill",
    "dolphin", "dragonfly", "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog",
    "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama",
    "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi",
    "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone",
    "schooner", "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish",
    "stegosaurus", "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
]
CIFAR100_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?&()/:;\"+#%*="
TOKEN_VOCAB_SIZE = 1024


def _normalise_text(text: str) -> str:
    import unicodedata

    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.lower().replace("_", " ")


def tokenizer_corpus() -> Counter:
    """Word frequencies the BPE is learned from: templates and class-name vocabularies."""
    import re

    words: Counter = Counter()
    pattern = re.compile(r"\w+|[^\w\s]+")
    texts = [t.replace("{}", " ") for t in CORPUS_TEMPLATES]
    texts += CIFAR10_NAMES + CIFAR100_NAMES + CALTECH101_NAMES
    for text in texts:
        for word in pattern.findall(_normalise_text(text)):
            word = "".join(ch for ch in word if ch in TOKEN_ALPHABET)
            if word:
                words[word] += 1
    return words


def learn_bpe(word_freqs: Counter, vocab_size: int = TOKEN_VOCAB_SIZE) -> tuple[dict[str, int], list]:
    """A plain, deterministic BPE learner (ties broken by the pair's text)."""
    vocab = list(SPECIAL_TOKENS)
    for ch in sorted(set(TOKEN_ALPHABET)):
        vocab += [ch, ch + "</w>"]
    known = set(vocab)
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(word_freqs)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        counts: Counter = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:]):
                counts[pair] += word_freqs[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = tuple(out)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_tokenizer():
    """A `PreTrainedTokenizerFast` (bos ... eos, right padding, 32 tokens at most)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = learn_bpe(tokenizer_corpus())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase(), normalizers.Replace("_", " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_TEXT_LENGTH, padding_side="right",
    )
