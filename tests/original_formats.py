"""Tiny checkpoints in the ORIGINAL on-disk formats of LLaVA-1.5, GeoChat and RS-LLaVA, built by code.

Nothing can be downloaded here, so these builders write, with random seeded weights and tiny
dimensions, exactly the files the published checkpoints consist of (reference models.md 1.4, 3.6,
4.1, 4.2):

- ``write_clip``: the stock CLIP folder (``openai/clip-vit-large-patch14-336`` scaled down): a full
  ``CLIPModel`` ``pytorch_model.bin`` with ``vision_model.*`` AND ``text_model.*`` keys (plus the old
  persistent ``position_ids`` buffers), ``config.json``, ``preprocessor_config.json``. 48 px with
  8-px patches = a 6 x 6 grid + CLS (the 336-px / 14-px original has 24 x 24 + CLS).
- ``write_sentencepiece``: a LLaMA-style SentencePiece ``tokenizer.model`` (BPE, byte fallback,
  ``<unk>``=0 ``<s>``=1 ``</s>``=2, identity normalisation, dummy prefix) WITHOUT ``<image>``, with
  a 4.3x-era ``tokenizer_config.json`` / ``special_tokens_map.json``.
- ``write_llava_repo``: a full LLaVA-repository model (LLaVA-1.5 style, or GeoChat with
  ``geochat=True``): ``config.json`` with the ``mm_*`` keys, keys ``model.embed_tokens.weight``,
  ``model.layers.{i}...``, ``lm_head.weight``, ``model.mm_projector.{0,2}.*`` and un-interpolated
  vision tensors ``model.vision_tower.vision_tower.vision_model.*`` (junk values: the loaders must
  ignore them), torch-saved ``pytorch_model-0000N-of-0000M.bin`` shards + index, tensors mostly
  float16 with float32 norms, old ``rotary_emb.inv_freq`` buffers included.
- ``write_mistral_base``: a bare Mistral-architecture base LM (GQA: 2 KV heads for 4 query heads)
  in transformers layout, safetensors shards + ``model.safetensors.index.json``, with its OWN
  SentencePiece tokenizer (another corpus and size than the Vicuna-like one).
- ``write_llava_repo_lora``: an RS-LLaVA-style LoRA folder for that base: ``config.json``
  (LlavaConfig with ``mm_*`` keys and the base's dimensions), peft-0.4 ``adapter_config.json`` and
  ``adapter_model.bin`` (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, ...),
  ``non_lora_trainables.bin`` (``base_model.model.model.mm_projector.0.weight``, ...).

GeoChat's tiny input is 72 px (9 x 9 grid), keeping GeoChat's ratio 504 / 336 = 3 / 2.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

CLIP_IMAGE_SIZE = 48
CLIP_PATCH = 8
CLIP_HIDDEN = 32
GEOCHAT_IMAGE_SIZE = 72
"""Tiny GeoChat input side: the 6 x 6 CLIP grid becomes 9 x 9 (as 24 x 24 becomes 36 x 36)."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPENAI_CLIP_ID = "openai/clip-vit-large-patch14-336"

VICUNA_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: Many buildings and some green trees are around a playground.",
    "A curved river passes through the green farmland with several roads.",
    "There are several white storage tanks next to the harbor.",
    "Classify the image from the following classes. Answer in one word or a short phrase.",
    "[refer] Give me the location of <p> the white ship </p>",
    "[identify] What is the object present at {<10><20><30><40>|<0>}",
    "Answer the question using a single word or phrase. Yes. No. Two airplanes.",
)
NEURAL_CHAT_CORPUS = (
    "The assistant provides helpful, detailed, and polite responses to the human's questions.",
    "If the assistant is unsure about the answer, it will respectfully communicate, 'I'm sorry, "
    "I do not know the answer' to maintain clarity and honesty in the interaction.",
    "Generate three questions and answers about the content of this image. Then, compile a summary.",
    "USER: Describe the image. ASSISTANT: An airport with two runways and many airplanes.",
    "Cars are parked in rows in a large parking lot beside a mall.",
)


# ---------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _added(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _normal(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _save_bin_shards(out: Path, state: dict[str, torch.Tensor], n_shards: int) -> None:
    """torch.save shards named like LLaVA's, with ``pytorch_model.bin.index.json`` (1 shard: no index)."""
    if n_shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(part, out / name)
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(
        out / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _save_safetensors_shards(out: Path, state: dict[str, torch.Tensor], n_shards: int) -> None:
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map: dict[str, str] = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map}
    )


# ---------------------------------------------------------------------------------------- tokenizer


def write_sentencepiece(out_dir: Path, *, corpus: tuple[str, ...], vocab_size: int) -> Path:
    """Train a LLaMA-style SentencePiece BPE model and write it with 4.3x-era tokenizer files.

    Returns:
        ``out_dir / "tokenizer.model"``.
    """
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 4),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": _added("<s>"),
            "clean_up_tokenization_spaces": False,
            "eos_token": _added("</s>"),
            "legacy": False,
            "model_max_length": 2048,
            "pad_token": None,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": _added("<unk>"),
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
    )
    return path


def sp_vocab_size(folder: Path) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size())


# ---------------------------------------------------------------------------------------- CLIP


def write_clip(out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny stock-CLIP folder: full CLIPModel weights (vision + text) as ``pytorch_model.bin``."""
    from transformers import CLIPConfig, CLIPModel

    out_dir.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=CLIP_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=CLIP_IMAGE_SIZE,
            patch_size=CLIP_PATCH,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    # Give the position table visible structure (smooth in x and y), so interpolation modes differ.
    gen = torch.Generator().manual_seed(seed + 1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grid = CLIP_IMAGE_SIZE // CLIP_PATCH
    yy, xx = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    freqs = torch.rand(CLIP_HIDDEN, 2, generator=gen) * 1.5
    phases = torch.rand(CLIP_HIDDEN, generator=gen) * 6.28
    smooth = torch.sin(freqs[:, 0, None, None] * yy + freqs[:, 1, None, None] * xx + phases[:, None, None])
    table = state["vision_model.embeddings.position_embedding.weight"]
    table[1:] = smooth.reshape(CLIP_HIDDEN, grid * grid).T * 0.5 + table[1:] * 0.1
    # The 2022 hub file still holds the (then persistent) position_ids buffers.
    state["vision_model.embeddings.position_ids"] = torch.arange(grid * grid + 1).unsqueeze(0)
    state["text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    torch.save(state, out_dir / "pytorch_model.bin")
    config.save_pretrained(out_dir)
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "crop_size": CLIP_IMAGE_SIZE,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": CLIP_IMAGE_SIZE,
        },
    )
    return out_dir


# ---------------------------------------------------------------------------------------- LMs


def _lm_state(
    gen: torch.Generator,
    *,
    vocab: int,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv_heads: int,
    inv_freq: bool,
) -> dict[str, torch.Tensor]:
    """LLaMA-layout LM tensors (``model.*``, ``lm_head.weight``): float16 matrices, float32 norms."""
    head_dim = hidden // heads
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _normal(gen, vocab, hidden, std=0.5).half()
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = _normal(gen, hidden, hidden, std=0.15).half()
        state[p + "self_attn.k_proj.weight"] = _normal(gen, kv_heads * head_dim, hidden, std=0.15).half()
        state[p + "self_attn.v_proj.weight"] = _normal(gen, kv_heads * head_dim, hidden, std=0.15).half()
        state[p + "self_attn.o_proj.weight"] = _normal(gen, hidden, hidden, std=0.15).half()
        if inv_freq:
            state[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (
                10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            )
        state[p + "mlp.gate_proj.weight"] = _normal(gen, inter, hidden, std=0.15).half()
        state[p + "mlp.up_proj.weight"] = _normal(gen, inter, hidden, std=0.15).half()
        state[p + "mlp.down_proj.weight"] = _normal(gen, hidden, inter, std=0.15).half()
        state[p + "input_layernorm.weight"] = 1.0 + _normal(gen, hidden, std=0.1)
        state[p + "post_attention_layernorm.weight"] = 1.0 + _normal(gen, hidden, std=0.1)
    state["model.norm.weight"] = 1.0 + _normal(gen, hidden, std=0.1)
    state["lm_head.weight"] = _normal(gen, vocab, hidden, std=0.3).half()
    return state


def _projector_state(gen: torch.Generator, prefix: str, hidden: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}mm_projector.0.weight": _normal(gen, hidden, CLIP_HIDDEN, std=0.3).half(),
        f"{prefix}mm_projector.0.bias": _normal(gen, hidden, std=0.1).half(),
        f"{prefix}mm_projector.2.weight": _normal(gen, hidden, hidden, std=0.2).half(),
        f"{prefix}mm_projector.2.bias": _normal(gen, hidden, std=0.1).half(),
    }


def _junk_vision_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Vision tensors as LLaVA checkpoints store them: the UN-interpolated table (577-row style)."""
    grid = CLIP_IMAGE_SIZE // CLIP_PATCH
    p = "model.vision_tower.vision_tower.vision_model."
    return {
        p + "embeddings.class_embedding": _normal(gen, CLIP_HIDDEN, std=1.0).half(),
        p + "embeddings.patch_embedding.weight": _normal(
            gen, CLIP_HIDDEN, 3, CLIP_PATCH, CLIP_PATCH, std=1.0
        ).half(),
        p + "embeddings.position_embedding.weight": _normal(
            gen, grid * grid + 1, CLIP_HIDDEN, std=1.0
        ).half(),
        p + "pre_layrnorm.weight": _normal(gen, CLIP_HIDDEN, std=1.0).half(),
        p + "encoder.layers.0.self_attn.q_proj.weight": _normal(
            gen, CLIP_HIDDEN, CLIP_HIDDEN, std=1.0
        ).half(),
    }


def _llama_config_keys(
    *, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int
) -> dict[str, Any]:
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 4096,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": vocab,
    }


def _mm_keys(vision_tower: str) -> dict[str, Any]:
    return {
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "mm_hidden_size": CLIP_HIDDEN,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def write_llava_repo(
    out_dir: Path,
    *,
    vision_tower: str,
    geochat: bool = False,
    n_shards: int = 2,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """A full LLaVA-repository checkpoint (LLaVA-1.5 style; GeoChat with ``geochat=True``).

    Args:
        out_dir: target folder (created).
        vision_tower: the ``mm_vision_tower`` value (a local CLIP folder or the hub id).
        geochat: GeoChat's config (``model_type`` geochat, GeoChatLlamaForCausalLM, 4.31-era keys).
        n_shards: number of ``pytorch_model-*.bin`` shards (1: a single ``pytorch_model.bin``).
        seed: weight seed.
        hidden: LM hidden size.
        layers: LM layers.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sentencepiece(out_dir, corpus=VICUNA_CORPUS, vocab_size=400)
    vocab = sp_vocab_size(out_dir)
    dims = dict(vocab=vocab, hidden=hidden, inter=2 * hidden, layers=layers, heads=4, kv_heads=4)
    gen = torch.Generator().manual_seed(seed)
    state = _lm_state(gen, **dims, inv_freq=geochat)
    state.update(_projector_state(gen, "model.", hidden))
    state.update(_junk_vision_state(gen))
    _save_bin_shards(out_dir, state, n_shards)
    config = _llama_config_keys(**dims)
    config.update(_mm_keys(vision_tower))
    if geochat:
        config.update(
            _name_or_path="path/to/geochat-7B",
            architectures=["GeoChatLlamaForCausalLM"],
            model_type="geochat",
            transformers_version="4.31.0",
        )
    else:
        config.update(
            _name_or_path="lmsys/vicuna-7b-v1.5",
            architectures=["LlavaLlamaForCausalLM"],
            model_type="llava",
            rope_theta=10000.0,
            tokenizer_model_max_length=2048,
            tokenizer_padding_side="right",
            transformers_version="4.37.2",
        )
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"},
    )
    return out_dir


def write_mistral_base(
    out_dir: Path, *, seed: int = 1, hidden: int = 64, layers: int = 2, n_shards: int = 2
) -> Path:
    """A bare Mistral-architecture base LM (neural-chat stand-in) with its own tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sentencepiece(out_dir, corpus=NEURAL_CHAT_CORPUS, vocab_size=360)
    vocab = sp_vocab_size(out_dir)
    dims = dict(vocab=vocab, hidden=hidden, inter=160, layers=layers, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(seed)
    _save_safetensors_shards(out_dir, _lm_state(gen, **dims, inv_freq=False), n_shards)
    config = _llama_config_keys(**dims)
    config.pop("pretraining_tp")
    config.update(
        _name_or_path="Intel/neural-chat-7b-v3-3",
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        rope_theta=10000.0,
        sliding_window=4096,
        transformers_version="4.34.0",
    )
    _write_json(out_dir / "config.json", config)
    return out_dir


def write_llava_repo_lora(
    out_dir: Path, *, base_dir: Path, vision_tower: str, r: int = 4, alpha: int = 8, seed: int = 2
) -> Path:
    """An RS-LLaVA-style LLaVA-repository LoRA folder for the base LM in ``base_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    hidden, layers, inter = base["hidden_size"], base["num_hidden_layers"], base["intermediate_size"]
    head_dim = hidden // base["num_attention_heads"]
    kv = base["num_key_value_heads"] * head_dim
    shapes = {  # (out, in)
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    gen = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for module, (n_out, n_in) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{module}."
            adapter[p + "lora_A.weight"] = _normal(gen, r, n_in, std=0.2)
            adapter[p + "lora_B.weight"] = _normal(gen, n_out, r, std=0.2)
    torch.save(adapter, out_dir / "adapter_model.bin")
    torch.save(_projector_state(gen, "base_model.model.model.", hidden), out_dir / "non_lora_trainables.bin")
    _write_json(
        out_dir / "adapter_config.json",
        {
            "auto_mapping": None,
            "base_model_name_or_path": "Intel/neural-chat-7b-v3-3",
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": alpha,
            "lora_dropout": 0.05,
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": r,
            "revision": None,
            "target_modules": sorted(LORA_TARGETS),
            "task_type": "CAUSAL_LM",
        },
    )
    config = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "_name_or_path")}
    config.update(_mm_keys(vision_tower))
    config.update(
        _name_or_path="Intel/neural-chat-7b-v3-3",
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava",
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        transformers_version="4.35.0",
    )
    _write_json(out_dir / "config.json", config)
    return out_dir
