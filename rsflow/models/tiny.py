"""A tiny, real LLaVA checkpoint built from code: the smoke model for wiring checks and tests.

No machine here can download weights, so tests and ``--model smoke`` use a checkpoint built on the
spot that has the same on-disk layout as ``llava-hf/llava-1.5-7b-hf``: a
``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector + LLaMA language model) saved
with ``save_pretrained`` as safetensors, a fast tokenizer trained here with the ``tokenizers``
package (LLaMA-like: BPE with byte fallback, ``▁`` word marker, ``<unk>=0 <s>=1 </s>=2``, then
``<image>`` and ``<pad>`` appended as special tokens), a ``CLIPImageProcessor`` and a
``LlavaProcessor``. It loads through exactly the code path of a real checkpoint.

Its weights are random, so its text is meaningless; ``rsflow.json`` beside it says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
import threading
from pathlib import Path
from typing import Any

from rsflow.errors import ModelError
from rsflow.models.prompts import (
    PROMPT_FORMATS,
    SYSTEM_LLAVA_V1,
    SYSTEM_RSLLAVA,
    SYSTEM_VICUNA_V1,
    TASK_PROMPTS,
    build_prompt,
)

logger = logging.getLogger(__name__)

SMOKE_NAME = "smoke-tiny-llava"
"""Human name of the smoke model (``rsflow.json`` ``name``)."""

SMOKE_CACHE_DIRNAME = "smoke-tiny-llava-v3"
"""Folder under ``<cache>/models/``; bump the suffix whenever the build recipe changes."""

SMOKE_LM_HEAD_STD = 0.16
"""Init std of the smoke model's output head (the other weights keep LLaMA's 0.02).

With the default 0.02 a 64-wide head cannot give any token a logit above about
``sqrt(64) * 0.02 * sqrt(64) = 1.3`` (RMS-normed hidden state of norm 8, head rows of norm 0.16), so
nothing a finetune teaches the frozen head becomes confident: LoRA on the language model plateaued at a
loss of 5.4 (ln 770 = 6.6) on the demo set. A pretrained model's head is far larger than its init;
0.16 (row norm about 1.3, top logits about 10) lets stage 2 reach a loss near 0.3 on the same data.
Measured on the demo set (``rsflow.finetune.demo``)."""

CARD_FILENAME = "rsflow.json"
"""The model card rsflow reads beside a checkpoint (``prompt_format``, ``name``, ``kind``)."""

# OpenAI CLIP normalisation (the values of openai/clip-vit-large-patch14-336's preprocessor).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_BPE_VOCAB_SIZE = 512  # trained pieces incl. the 3 specials; 256 byte-fallback pieces come on top
_UNK, _BOS, _EOS = "<unk>", "<s>", "</s>"
_IMAGE, _PAD = "<image>", "<pad>"

# Seeding goes through torch's global generator; threads building at once would interleave draws.
_SEED_LOCK = threading.Lock()

# Training text for the tokenizer: remote-sensing captions in the style of RSICD / UCM-captions /
# GeoChat answers, so common words become single pieces and prompts stay short.
_RS_SENTENCES = (
    "Many buildings and some green trees are around a playground.",
    "A curved river passes through the green farmland with several roads.",
    "There are several white storage tanks next to the harbor.",
    "Some boats are parked in the harbor near the dense residential area.",
    "An airport with two runways and many airplanes parked on the apron.",
    "The image shows a dense residential area with red roofs and narrow streets.",
    "A highway crosses the forest and a bridge spans the river.",
    "Several baseball fields are surrounded by trees and parking lots.",
    "The bare land is next to a lake with clear blue water.",
    "A large industrial area with factories, warehouses and trucks.",
    "Farmland is divided into rectangular fields of different colors.",
    "A stadium with a running track is located in the middle of the city.",
    "The beach is next to the sea and many people are on the sand.",
    "Cars are parked in rows in a large parking lot beside a mall.",
    "A wind turbine stands in a field of crops.",
    "Cloud cover hides part of the mountain and the snow on its peak.",
    "The desert has dunes and a few sparse plants.",
    "Several ships are sailing on the water near the port.",
    "There is a roundabout with four roads connected to it.",
    "A railway station with many tracks and trains.",
    "A swimming pool is in the backyard of a house surrounded by lawn.",
    "A meadow is next to a pond and a small forest.",
    "Tennis courts and a basketball court are next to a school.",
    "The overpass connects two highways with heavy traffic.",
    "Solar panels cover the roof of the large building.",
    "A church with a tall tower is in the center of the square.",
    "A golf course with green fairways, sand bunkers and ponds.",
    "The sparse residential area has detached houses with gardens.",
    "A dam holds back the water of the reservoir.",
    "Flooded fields after heavy rain along the river bank.",
    "Sentinel-2 and Landsat scenes at 10 m and 30 m resolution.",
    "What is the land cover of this image? Answer the question using a single word or phrase.",
    "Classify the image from the following classes. Answer in one word or a short phrase.",
    "How many airplanes are in the image? Are there any ships? Yes. No.",
    "[refer] Give me the location of <p> the white ship </p>",
    "[grounding] Describe the image and give the locations of the objects.",
    "[identify] What is the object present at {<10><20><30><40>|<0>}",
    "Generate three questions and answers about the content of this image. Then, compile a summary.",
)


def _tokenizer_corpus() -> list[str]:
    texts = list(_RS_SENTENCES)
    texts += [SYSTEM_LLAVA_V1, SYSTEM_VICUNA_V1, SYSTEM_RSLLAVA]
    for per_format in TASK_PROMPTS.values():
        for fmt, questions in per_format.items():
            texts += [build_prompt(fmt, q).replace(_IMAGE, "") for q in questions]
    return texts


def _train_tokenizer() -> Any:
    """Train a LLaMA-like BPE tokenizer and return it wrapped as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [c for c in string.printable if c not in " \t\r\x0b\x0c"]  # space becomes ▁
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=[_UNK, _BOS, _EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    draft = Tokenizer(models.BPE(unk_token=_UNK))
    draft.pre_tokenizer = metaspace
    draft.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    trained = json.loads(draft.to_str())["model"]

    # Re-lay the vocabulary as LLaMA does: specials 0-2, then the 256 byte pieces <0x00>..<0xFF>
    # (so any character outside the alphabet still round-trips), then the trained pieces in order.
    vocab: dict[str, int] = {_UNK: 0, _BOS: 1, _EOS: 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, 1)]
    )
    tok.add_special_tokens(
        [
            AddedToken(_UNK, special=True, normalized=False),
            AddedToken(_BOS, special=True, normalized=False),
            AddedToken(_EOS, special=True, normalized=False),
        ]
    )
    # <image> then <pad> right after the base vocabulary, as the llava-hf converter does (32000, 32001).
    tok.add_special_tokens([AddedToken(_IMAGE, special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(_PAD, special=True, normalized=False)])

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        pad_token=_PAD,
        extra_special_tokens={"image_token": _IMAGE},
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llava(
    out_dir: str | os.PathLike[str],
    *,
    image_size: int = 64,
    patch_size: int = 16,
    seed: int = 0,
    prompt_format: str = "llava",
    card: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    init_device: str = "cpu",
    lm_head_std: float | None = None,
) -> Path:
    """Build and save a tiny random-weight LLaVA-1.5-shaped checkpoint.

    The overrides make the same builder produce full-size architectures with random weights
    (e.g. LLaVA-1.5-7B's published dimensions for GPU benchmarks, where the real weights cannot
    be downloaded); ``init_device="cuda"`` initialises such a model on the GPU.

    Layout written to ``out_dir`` (created if missing): ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (the CLIP tower's tensors under the published llava-hf names,
    ``vision_tower.vision_model.*``, which transformers loads and vLLM 0.29 requires), ``tokenizer.json`` +
    ``tokenizer_config.json``, ``preprocessor_config.json`` / ``processor_config.json``, and
    ``rsflow.json`` (written last).

    Args:
        out_dir: target folder.
        image_size: vision tower input side in pixels (a multiple of ``patch_size``).
        patch_size: CLIP patch side in pixels; the image gives ``(image_size // patch_size) ** 2`` tokens.
        seed: torch seed for the weights; the same seed gives byte-identical weights.
        prompt_format: recorded in ``rsflow.json`` (``"llava"``, ``"rsllava"`` or ``"geochat"``).
        card: extra keys merged over the default ``rsflow.json`` contents.
        vision_overrides: CLIPVisionConfig fields replacing the tiny defaults.
        text_overrides: LlamaConfig fields replacing the tiny defaults.
        dtype: torch dtype name the weights are created and saved in.
        init_device: where the weights are initialised (``cpu`` or ``cuda``).
        lm_head_std: re-draw the output head from N(0, lm_head_std) (None: the config's init, 0.02);
            see :data:`SMOKE_LM_HEAD_STD`.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: ``image_size`` not a positive multiple of ``patch_size``, or unknown ``prompt_format``.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise ValueError(
            f"image_size ({image_size}) must be a positive multiple of patch_size ({patch_size})"
        )
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if lm_head_std is not None and not lm_head_std > 0:
        raise ValueError(f"lm_head_std must be > 0, got {lm_head_std}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(_IMAGE)
    pad_token_id = tokenizer.convert_tokens_to_ids(_PAD)
    num_image_tokens = (image_size // patch_size) ** 2  # "default" strategy drops CLS

    vision_kwargs: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    vision_kwargs.update(vision_overrides or {})
    vision_config = CLIPVisionConfig(**vision_kwargs)
    text_kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Mistral-based RS-LLaVA
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    text_kwargs.update(text_overrides or {})
    if text_kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"text vocab_size {text_kwargs['vocab_size']} < tokenizer size {len(tokenizer)}")
    text_config = LlamaConfig(**text_kwargs)
    tokenizer.model_max_length = int(text_kwargs["max_position_embeddings"])
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )

    # Seed a private generator state only for the duration of the build (no global side effect).
    torch_dtype = getattr(torch, dtype)
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            with torch.device(init_device):
                model = LlavaForConditionalGeneration(config)
                if lm_head_std is not None:
                    with torch.no_grad():
                        model.lm_head.weight.normal_(0.0, lm_head_std)
        finally:
            torch.set_default_dtype(previous)
    model.eval()  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
        do_sample=False,
    )
    # The published llava-hf tensor names, as `rsflow convert` writes: the only layout vLLM 0.29's LLaVA
    # (--engine vllm) loads. (Its CPU build also refuses this model's attention head size, 16.)
    from rsflow.models.formats import save_llava_hf

    save_llava_hf(model, out)

    # The PIL backend needs no torchvision; it saves as "CLIPImageProcessor", like llava-hf checkpoints.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=_IMAGE,
    )
    processor.save_pretrained(out)

    meta: dict[str, Any] = {
        "kind": "smoke",
        "name": SMOKE_NAME,
        "prompt_format": prompt_format,
        "note": "random weights: its text is meaningless; for wiring checks only",
    }
    meta.update(card or {})
    (out / CARD_FILENAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("built tiny LLaVA checkpoint in %s (seed %d, %d px)", out, seed, image_size)
    return out


def default_cache_dir() -> Path:
    """``$RSFLOW_CACHE`` if set, else ``~/.cache/rsflow``."""
    env = os.environ.get("RSFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rsflow"


def ensure_smoke_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cached smoke checkpoint, building it on first use.

    The checkpoint lives in ``<cache>/models/smoke-tiny-llava-v3/`` with ``<cache>`` = ``cache_dir``,
    else ``$RSFLOW_CACHE``, else ``~/.cache/rsflow``. It is built in a temporary sibling folder and
    renamed into place, so concurrent processes (e.g. several Ray actors) never see a half-written
    checkpoint: the first rename wins and the others discard their copy.

    Args:
        cache_dir: cache root override.

    Returns:
        The checkpoint folder.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / SMOKE_CACHE_DIRNAME
    if (target / CARD_FILENAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOKE_CACHE_DIRNAME}.tmp-", dir=target.parent))
    try:
        build_tiny_llava(tmp, lm_head_std=SMOKE_LM_HEAD_STD)
        try:
            os.rename(tmp, target)
            logger.info("cached smoke model at %s", target)
        except OSError:
            # Another process renamed its copy first (target exists and is not empty).
            if not (target / CARD_FILENAME).is_file():
                raise ModelError(
                    f"{target} exists but is not a complete smoke checkpoint; delete it and retry"
                ) from None
            logger.debug("smoke model already cached at %s by another process", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
