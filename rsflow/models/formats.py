"""Load and convert the ORIGINAL LLaVA-repository checkpoints (GeoChat-7B, RS-LLaVA's LoRA adapter).

The published remote-sensing models are not in transformers' LLaVA layout (reference models.md 3.6,
4.2, 5):

- ``"llava-repo"``: a full model as haotian-liu/LLaVA saves it (GeoChat-7B, llava-v1.5-7b):
  ``config.json`` = a LlamaConfig plus ``mm_*`` keys (``model_type`` ``llava`` / ``geochat``),
  ``pytorch_model-0000N-of-0000M.bin`` shards + ``pytorch_model.bin.index.json`` (or safetensors),
  keys ``model.embed_tokens.weight``, ``model.layers.*``, ``lm_head.weight``,
  ``model.mm_projector.{0,2}.*`` and ignored ``model.vision_tower.vision_tower.vision_model.*``, and
  a SentencePiece ``tokenizer.model`` WITHOUT an ``<image>`` token.
- ``"llava-repo-lora"``: a LoRA adapter as LLaVA's ``train.py`` saves it (RS-LLaVA):
  ``config.json`` (LlavaConfig with ``mm_*`` keys and the base LM's dimensions), ``adapter_config.json``
  + ``adapter_model.bin`` (peft-0.4 keys ``base_model.model.model.layers.{i}...lora_A.weight``) and
  ``non_lora_trainables.bin`` (the projector, keys ``base_model.model.model.mm_projector.0.weight``),
  applied to a bare base LM (``"bare-lm"``: a LlamaForCausalLM / MistralForCausalLM folder) whose
  tokenizer it uses.
- ``"hf-llava"`` (transformers ``LlavaForConditionalGeneration``) and ``"peft"`` (a transformers-format
  PEFT adapter) need no conversion; ``detect_format`` only recognises them.

The vision tower is never taken from these checkpoints: as in LLaVA's builder it is the stock
``openai/clip-vit-large-patch14-336`` (a ``CLIPModel`` folder with ``vision_model.*`` keys), read from
a LOCAL folder: the ``vision_tower=`` argument (the ``--vision-tower`` flag) when given, else the
config's ``mm_vision_tower`` when that is a local folder. For GeoChat its position table is
interpolated once, exactly as GeoChat's ``clip_interpolate_embeddings`` does (models.md 3.2).

What the loaders build: a ``LlavaForConditionalGeneration`` whose vocabulary is the checkpoint's
plus two added special tokens, ``<image>`` (= original vocab size V, the placeholder the model's
``masked_scatter`` fills) and ``<pad>`` (V + 1). Their embedding and ``lm_head`` rows are the MEAN of
the V original rows (deterministic, unlike the llava-hf converter's random draws), and the model's
``generation_config.suppress_tokens`` lists every id >= V, so greedy decoding can never choose a token
the original model did not have. The model is instantiated with its parameters on the meta device and
the checkpoint tensors are assigned shard by shard (``load_state_dict(assign=True)``), so a 7B model
never exists twice in memory; every parameter must be filled or loading fails, and checkpoint tensors
that map to nothing are logged and listed in ``info["ignored_keys"]``.

Public API: ``detect_format``, ``load_llava_repo``, ``load_llava_repo_lora``, ``load_original``,
``convert``, ``export_llava_repo_lora``, ``llava_chunked_ids``, ``interpolate_clip_positions``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

import torch

from rsflow.errors import ModelError, RequestError
from rsflow.models.prompts import IMAGE_TOKEN, PROMPT_FORMATS

logger = logging.getLogger(__name__)

CheckpointFormat = Literal["hf-llava", "llava-repo", "llava-repo-lora", "peft", "bare-lm"]
CHECKPOINT_FORMATS: Final[tuple[str, ...]] = get_args(CheckpointFormat)

PAD_TOKEN: Final[str] = "<pad>"
"""Pad token added after ``<image>`` (ids V and V + 1, as the llava-hf converter does)."""

CARD_FILENAME: Final[str] = "rsflow.json"
"""The model card written beside a converted checkpoint (read by ``spec.model_card``)."""

ADAPTER_SUBDIR: Final[str] = "adapter"
"""Where ``convert`` writes the transformers-format PEFT adapter of an unmerged LoRA source."""

GEOCHAT_IMAGE_SIZE: Final[int] = 504
"""GeoChat's input side in pixels for the 336-px CLIP-L/14 (36 x 36 = 1296 patches)."""

CLIP_IMAGE_SIZE: Final[int] = 336
"""Input side of ``openai/clip-vit-large-patch14-336`` in pixels."""

# OpenAI CLIP normalisation (models.md 1.3).
CLIP_MEAN: Final[tuple[float, float, float]] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Final[tuple[float, float, float]] = (0.26862954, 0.26130258, 0.27577711)

_CONFIG = "config.json"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_NON_LORA = "non_lora_trainables.bin"
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_MM_KEYS = ("mm_vision_tower", "mm_projector_type")
_LLAVA_REPO_TYPES = frozenset({"llava", "geochat", "llava_llama", "llava_mistral"})
_LLAVA_REPO_ARCHS = frozenset({"LlavaLlamaForCausalLM", "GeoChatLlamaForCausalLM", "LlavaMistralForCausalLM"})
_BARE_LM_TYPES = {"llama": "llama", "mistral": "mistral"}
_BARE_LM_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_CLIP_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")

TextArch = Literal["llama", "mistral"]


# ---------------------------------------------------------------------------------------- detection


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RequestError(flag, f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RequestError(flag, f"{path}: not a JSON object")
    return data


def _is_geochat(config: Mapping[str, Any]) -> bool:
    """GeoChat's own checkpoints say so by model_type or architecture (504 px, geochat template)."""
    return str(config.get("model_type")) == "geochat" or "GeoChatLlamaForCausalLM" in (
        config.get("architectures") or ()
    )


def _has_mm_keys(config: Mapping[str, Any]) -> bool:
    return any(config.get(key) for key in _MM_KEYS)


def _is_llava_repo_config(config: Mapping[str, Any]) -> bool:
    archs = set(config.get("architectures") or ())
    return str(config.get("model_type", "")) in _LLAVA_REPO_TYPES or bool(archs & _LLAVA_REPO_ARCHS)


def _bare_lm_arch(config: Mapping[str, Any]) -> TextArch | None:
    arch = _BARE_LM_TYPES.get(str(config.get("model_type", "")))
    for name in config.get("architectures") or ():
        arch = arch or _BARE_LM_ARCHS.get(str(name))
    return arch  # type: ignore[return-value]


def weight_files(folder: str | os.PathLike[str], flag: str = "--model") -> list[Path]:
    """The weight files of a checkpoint folder, in load order.

    A sharded checkpoint is read from its ``*.index.json`` (``model.safetensors.index.json``, then
    ``pytorch_model.bin.index.json``), and every shard it lists must exist; otherwise the single
    ``model.safetensors`` or ``pytorch_model.bin``.

    Raises:
        RequestError: (``flag``) an index lists a missing shard, or there are no weights.
    """
    root = Path(folder)
    for name in _INDEX_FILES:
        index_path = root / name
        if not index_path.is_file():
            continue
        weight_map = _read_json(index_path, flag).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RequestError(flag, f"{root}: {name} has no weight_map")
        shards = sorted(set(str(v) for v in weight_map.values()))
        for shard in shards:
            if not (root / shard).is_file():
                raise RequestError(
                    flag, f"{root}: {name} lists {shard}, which is missing; download every shard"
                )
        return [root / shard for shard in shards]
    for name in _SINGLE_FILES:
        if (root / name).is_file():
            return [root / name]
    raise RequestError(
        flag,
        f"{root}: no weights (model.safetensors, pytorch_model.bin, or shards with "
        "model.safetensors.index.json / pytorch_model.bin.index.json)",
    )


def _adapter_weights(folder: Path, flag: str) -> Path:
    for name in _ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise RequestError(
        flag, f"{folder} has adapter_config.json but no adapter_model.safetensors / adapter_model.bin"
    )


def detect_format(path: str | os.PathLike[str], *, flag: str = "--model") -> str:
    """Which on-disk format a checkpoint or adapter folder is in.

    Reads JSON files and checks that weight files exist; never loads tensors.

    Args:
        path: the folder.
        flag: the flag named in errors (``"--model"`` or ``"--adapter"``).

    Returns:
        One of ``CHECKPOINT_FORMATS``: ``"hf-llava"`` (transformers LLaVA: ``model_type`` llava with
        ``text_config``), ``"llava-repo"`` (original full model: ``mm_*`` keys, no ``text_config``),
        ``"llava-repo-lora"`` (adapter files + ``non_lora_trainables.bin`` + ``config.json`` with
        ``mm_*`` keys), ``"peft"`` (adapter files only), ``"bare-lm"`` (a Llama/Mistral causal LM).

    Raises:
        RequestError: (``flag``) a missing folder, file or key, or a folder in no known format.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise RequestError(flag, f"no such folder {str(root)!r}")
    if not root.is_dir():
        raise RequestError(flag, f"{root} is a file; give the checkpoint folder")
    config_path = root / _CONFIG
    config = _read_json(config_path, flag) if config_path.is_file() else None

    if (root / _ADAPTER_CONFIG).is_file():
        _adapter_weights(root, flag)
        if (root / _NON_LORA).is_file():
            if config is None:
                raise RequestError(
                    flag, f"{root} has non_lora_trainables.bin but no config.json (the LLaVA config it needs)"
                )
            if not _has_mm_keys(config):
                raise RequestError(
                    flag,
                    f"{root}: config.json has no mm_vision_tower / mm_projector_type: not a LLaVA adapter",
                )
            return "llava-repo-lora"
        if config is not None and _has_mm_keys(config):
            raise RequestError(
                flag,
                f"{root} looks like a LLaVA-repository LoRA adapter but has no non_lora_trainables.bin "
                "(it holds the projector); download it beside adapter_model.bin",
            )
        return "peft"

    if config is None:
        raise RequestError(flag, f"{root} has no config.json (nor adapter_config.json)")
    if config.get("model_type") == "llava" and ("text_config" in config or "vision_config" in config):
        return "hf-llava"
    if _has_mm_keys(config):
        weight_files(root, flag)
        return "llava-repo"
    if _is_llava_repo_config(config):
        raise RequestError(
            flag, f"{root}: config.json has no mm_vision_tower / mm_projector_type: not a LLaVA checkpoint"
        )
    if _bare_lm_arch(config) is not None:
        weight_files(root, flag)
        return "bare-lm"
    raise RequestError(
        flag,
        f"{root}: unrecognised checkpoint (model_type {config.get('model_type')!r}, architectures "
        f"{config.get('architectures')!r}); expected a LLaVA-repository model (mm_* keys), a "
        "transformers LLaVA, or a Llama/Mistral language model",
    )


# ---------------------------------------------------------------------------------------- tensors


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict, memory-mapped when the file allows it (zip format)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-1.6, non-zip) pickles cannot be memory-mapped
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a state dict (got {type(data).__name__})")
    return data


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of one weight file, one tensor at a time for safetensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield key, handle.get_tensor(key)
    else:
        yield from _torch_load(path).items()


def tensor_names(folder: str | os.PathLike[str], flag: str = "--model") -> list[str]:
    """The tensor names of a checkpoint folder's safetensors weights (:func:`weight_files`), from the
    files' headers: no tensor is loaded. Torch-pickled weights (``.bin``) are not listed."""
    from safetensors import safe_open

    names: list[str] = []
    for path in weight_files(folder, flag):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="np") as handle:
                names.extend(handle.keys())
    return names


# ---------------------------------------------------------------------------------------- empty model

_META_LOCK = threading.Lock()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while buffers are built as usual.

    Parameters cost nothing until checkpoint tensors are assigned to them; buffers that are not in
    checkpoints (rotary ``inv_freq``, CLIP ``position_ids``) are computed for real, so no second pass
    has to re-derive them. ``nn.Module.register_parameter`` is swapped for the duration (under a lock).
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            current = module._parameters[name]
            assert current is not None
            module._parameters[name] = type(current)(current.to("meta"), requires_grad=current.requires_grad)

    with _META_LOCK:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign, assignment]
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class _Layout:
    """Where the parts of a ``LlavaForConditionalGeneration`` live, read from its own state dict."""

    lm_prefix: str
    """Prefix of the language model's keys (``model.language_model.`` in transformers 5)."""

    lm_head: str
    """Key of the output projection (``lm_head.weight``)."""

    projector_prefix: str
    """Prefix of the projector (``model.multi_modal_projector.``)."""

    vision_prefix: str
    """Prefix of the CLIP vision model (``model.vision_tower.``)."""

    shapes: dict[str, torch.Size] = field(repr=False)
    """Every state-dict key of the module and its shape."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> _Layout:
        shapes = {key: value.shape for key, value in model.state_dict().items()}

        def find(suffix: str, must_contain: str) -> str:
            hits = [k for k in shapes if k.endswith(suffix) and must_contain in k]
            if len(hits) != 1:
                raise ModelError(f"cannot place {suffix!r} in this transformers' LLaVA (found {hits})")
            return hits[0][: -len(suffix)]

        embed = find("embed_tokens.weight", "")
        return cls(
            lm_prefix=embed,
            lm_head=find("lm_head.weight", "") + "lm_head.weight",
            projector_prefix=find("linear_1.weight", "multi_modal_projector") + "",
            vision_prefix=find("embeddings.position_embedding.weight", "vision"),
            shapes=shapes,
        )

    @property
    def embed_key(self) -> str:
        return self.lm_prefix + "embed_tokens.weight"

    def from_llava_repo(self, key: str) -> tuple[str, str | None]:
        """``(kind, transformers key)`` of a LLaVA-repository key (models.md 5.1/5.2).

        kinds: ``"lm"``, ``"projector"`` (mapped), ``"vision"`` (ignored: the tower comes from CLIP),
        ``"buffer"`` (recomputed), ``"unknown"``.
        """
        if key.endswith((".inv_freq", "position_ids")):
            return "buffer", None
        if key.startswith("model.vision_tower."):
            return "vision", None
        if key.startswith("model.mm_projector."):
            match = re.match(r"^model\.mm_projector\.(\d+)\.(.+)$", key)
            linear = {"0": "linear_1", "2": "linear_2"}.get(match.group(1)) if match else None
            if match is None or linear is None:
                return "unknown", None
            return "projector", f"{self.projector_prefix}{linear}.{match.group(2)}"
        if key == "lm_head.weight":
            return "lm", self.lm_head
        if key.startswith("model."):
            return "lm", self.lm_prefix + key[len("model.") :]
        return "unknown", None

    def from_clip(self, key: str) -> str | None:
        """The transformers key of a CLIP checkpoint key (``vision_model.X`` or a bare ``X``)."""
        if key.startswith(_CLIP_NON_VISION) or key.endswith("position_ids"):
            return None
        key = key.removeprefix("vision_model.")
        return self.vision_prefix + key


def hf_to_llava_repo(key: str) -> str | None:
    """The LLaVA-repository name of a transformers LLaVA key (current or legacy layout)."""
    for prefix in ("model.language_model.", "language_model.model."):
        if key.startswith(prefix):
            return "model." + key[len(prefix) :]
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    match = re.match(r"^(?:model\.)?multi_modal_projector\.linear_([12])\.(.+)$", key)
    if match:
        return f"model.mm_projector.{0 if match.group(1) == '1' else 2}.{match.group(2)}"
    return None


# ---------------------------------------------------------------------------------------- vision


def interpolate_clip_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """GeoChat's CLIP position table for a larger input (``clip_interpolate_embeddings``).

    Row 0 (CLS) is kept; the other ``g*g`` rows, read row-major as a ``g x g`` grid (patch ``p`` at
    row ``p // g``, column ``p % g``), are resized channels-first to ``grid x grid`` with bicubic
    interpolation and ``align_corners=True``, in float32 (models.md 3.2). 24 -> 36 for 336 -> 504 px.

    Args:
        table: ``[1 + g*g, D]`` position embeddings.
        grid: the new grid side (patches per side).

    Returns:
        ``[1 + grid*grid, D]`` float32 table.

    Raises:
        ValueError: ``table`` has no square grid after its CLS row.
    """
    weights = table.detach().to(torch.float32)
    n_patches, dim = weights.shape[0] - 1, weights.shape[1]
    side = math.isqrt(n_patches)
    if side * side != n_patches or n_patches < 1:
        raise ValueError(f"position table of {weights.shape[0]} rows has no square grid after the CLS row")
    if side == grid:
        return weights.clone()
    cls_row, patches = weights[:1], weights[1:]
    image = patches.T.reshape(1, dim, side, side)
    resized = torch.nn.functional.interpolate(image, size=grid, mode="bicubic", align_corners=True)
    return torch.cat([cls_row, resized.reshape(dim, grid * grid).T], dim=0)


def _resolve_vision_tower(
    config: Mapping[str, Any], vision_tower: str | os.PathLike[str] | None, source: Path
) -> Path:
    """The local CLIP folder: ``vision_tower`` when given, else ``mm_vision_tower`` if it is local.

    Raises:
        RequestError: (``--vision-tower``) neither gives a local folder holding a CLIP config and weights.
    """
    named = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    if vision_tower is not None:
        folder = Path(vision_tower).expanduser()
        origin = "--vision-tower"
    else:
        candidates = [Path(named).expanduser(), source / named] if named else []
        local = [c for c in candidates if c.is_dir()]
        if not local:
            raise RequestError(
                "--vision-tower",
                f"{source}: config.json names the vision tower {named or '(none)'!r}, which is not a local "
                "folder; download it (openai/clip-vit-large-patch14-336: a CLIPModel folder with "
                "config.json and weights) and pass --vision-tower DIR",
            )
        folder, origin = local[0], "mm_vision_tower"
    if not folder.is_dir():
        raise RequestError("--vision-tower", f"no such folder {str(folder)!r}")
    if not (folder / _CONFIG).is_file():
        raise RequestError("--vision-tower", f"{folder} has no config.json; give a CLIP model folder")
    weight_files(folder, "--vision-tower")
    if named and vision_tower is not None:
        logger.info("vision tower: %s (--vision-tower; config.json names %s)", folder, named)
    else:
        logger.info("vision tower: %s (from %s)", folder, origin)
    return folder.resolve()


def _clip_vision_config(folder: Path) -> Any:
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(folder)
    except Exception as exc:
        raise RequestError(
            "--vision-tower", f"{folder}: cannot read a CLIP vision config ({type(exc).__name__}: {exc})"
        ) from exc


# ---------------------------------------------------------------------------------------- tokenizer


def _load_tokenizer(folder: Path, flag: str) -> Any:
    """The checkpoint's own tokenizer (a SentencePiece ``tokenizer.model`` is converted on load).

    A LlamaConfig is handed to ``AutoTokenizer`` so that it does not parse the folder's config.json
    (a ``geochat`` / ``llava`` model type it does not know); it only decides the tokenizer class when
    ``tokenizer_config.json`` names none.
    """
    from transformers import AutoTokenizer, LlamaConfig

    try:
        return AutoTokenizer.from_pretrained(folder, config=LlamaConfig())
    except Exception as exc:
        if not (folder / "tokenizer.model").is_file():
            raise RequestError(
                flag, f"{folder}: cannot load its tokenizer ({type(exc).__name__}: {exc})"
            ) from exc
        from transformers import LlamaTokenizer

        try:
            return LlamaTokenizer.from_pretrained(folder)
        except Exception as exc2:
            raise ModelError(
                f"{folder}: cannot load tokenizer.model ({type(exc2).__name__}: {exc2}); reading a "
                "SentencePiece model needs the sentencepiece and protobuf packages "
                "(pip install sentencepiece protobuf)"
            ) from exc2


def _add_llava_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add ``<image>`` and ``<pad>`` (pad token) as special tokens; return their ids."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # Always <pad>, as the llava-hf converter does (LLaVA's own pad = unk is a training-time choice).
    tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    tokenizer.padding_side = "left"
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)), int(tokenizer.pad_token_id)


def llava_chunked_ids(tokenizer: Any, prompt: str, image_token_id: int, n_image_tokens: int) -> list[int]:
    """Token ids of ``prompt`` as LLaVA's ``tokenizer_image_token`` makes them, image span expanded.

    The prompt is split at every ``<image>``; each chunk is tokenised on its own (so SentencePiece
    puts its dummy-prefix ``▁`` at the start of every chunk); if the first chunk starts with BOS,
    that BOS is kept and the first id of EVERY chunk is dropped (LLaVA's ``offset``). Between
    chunks, where LLaVA puts its single ``-200`` placeholder, this puts ``n_image_tokens`` copies of
    ``image_token_id`` (what ``LlavaForConditionalGeneration`` fills with the image features).

    Known difference from LLaVA's slow SentencePiece tokenizer: transformers' LLaMA tokenizer adds no
    dummy prefix to a chunk that already starts with a space (SentencePiece adds one). LLaVA-style
    prompts (``...USER: <image>\\n...``) have no such chunk.

    Args:
        tokenizer: a transformers tokenizer (called as ``tokenizer(text)["input_ids"]``).
        prompt: the full template prompt with literal ``<image>`` placeholder(s).
        image_token_id: the id standing for one image feature.
        n_image_tokens: image features per image (576 at 336 px, 1296 for GeoChat).

    Returns:
        The ids.

    Raises:
        ValueError: ``n_image_tokens`` < 1.
    """
    if n_image_tokens < 1:
        raise ValueError(f"n_image_tokens must be >= 1, got {n_image_tokens}")
    chunks = [list(tokenizer(chunk)["input_ids"]) for chunk in prompt.split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids: list[int] = [chunks[0][0]] if offset else []
    for index, chunk in enumerate(chunks):
        if index:
            ids += [image_token_id] * n_image_tokens
        ids += chunk[offset:]
    return ids


# ---------------------------------------------------------------------------------------- config


def _check_mm_config(config: Mapping[str, Any], source: Path, flag: str) -> Literal["default", "full"]:
    """Refuse LLaVA variants the transformers LLaVA cannot express; return the feature strategy."""
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise RequestError(
            flag,
            f"{source}: mm_projector_type {projector!r} is not supported; only mlp2x_gelu "
            "(LLaVA-1.5, GeoChat, RS-LLaVA)",
        )
    if config.get("mm_use_im_start_end"):
        raise RequestError(flag, f"{source}: mm_use_im_start_end true (<im_start>/<im_end>) is not supported")
    aspect = config.get("image_aspect_ratio")
    if aspect not in (None, "pad", "square", "crop"):
        raise RequestError(flag, f"{source}: image_aspect_ratio {aspect!r} (LLaVA-NeXT) is not supported")
    if str(config.get("mm_patch_merge_type", "flat")) != "flat":
        raise RequestError(
            flag, f"{source}: mm_patch_merge_type {config['mm_patch_merge_type']!r} is not supported"
        )
    select = config.get("mm_vision_select_feature", "patch")
    strategies: dict[str, Literal["default", "full"]] = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise RequestError(flag, f"{source}: mm_vision_select_feature {select!r} is not patch or cls_patch")
    return strategies[select]


def _text_config(config: Mapping[str, Any], arch: TextArch, vocab_size: int, pad_id: int) -> Any:
    """A LlamaConfig / MistralConfig with the LM dimensions of a LLaVA-repository config."""
    from transformers import LlamaConfig, MistralConfig

    heads = int(config["num_attention_heads"])
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=pad_id,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    if config.get("head_dim"):
        kwargs["head_dim"] = int(config["head_dim"])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        rope.update({k: v for k, v in scaling.items() if k != "type"})
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    kwargs["rope_parameters"] = rope
    if arch == "mistral":
        # RS-LLaVA runs its Mistral base through LLaVA's LLaMA code path: no sliding window.
        return MistralConfig(sliding_window=None, **kwargs)
    kwargs["attention_bias"] = bool(config.get("attention_bias", False))
    return LlamaConfig(**kwargs)


def _scaled_grid(clip_size: int, patch: int) -> int:
    """GeoChat's grid for a CLIP of ``clip_size`` px: 504/336 = 3/2 times the CLIP grid (24 -> 36)."""
    grid = clip_size // patch
    return (grid * GEOCHAT_IMAGE_SIZE) // CLIP_IMAGE_SIZE


def _prompt_format_or(value: str | None, default: str, flag: str = "--prompt-format") -> str:
    if value is None:
        return default
    if value not in PROMPT_FORMATS:
        raise RequestError(flag, f"{value!r} is not one of {', '.join(PROMPT_FORMATS)}")
    return value


# ---------------------------------------------------------------------------------------- assembly


@dataclass(frozen=True)
class _Lora:
    """LoRA factors keyed by the transformers WEIGHT key of the Linear they adapt."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """``{weight key: (A [r, in], B [out, r])}``."""

    alpha: float
    use_rslora: bool
    config: dict[str, Any]
    """The adapter_config.json as read."""

    def scale(self, rank: int) -> float:
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank


@dataclass(frozen=True)
class _Plan:
    """Everything needed to assemble one LLaVA from original files."""

    config: dict[str, Any]
    """The LLaVA-repository config.json (mm_* keys + LM dimensions)."""

    arch: TextArch
    weights: tuple[Path, ...]
    """LM (+ projector) weight files in LLaVA-repository / transformers-LM naming."""

    tokenizer_dir: Path
    clip_dir: Path
    geochat: bool
    source: Path
    flag: str
    """Flag named in errors about ``weights``."""


def unspeakable_ids(first_unused: int, rows: int, *special: int | None, keep: Iterable[int] = ()) -> list[int]:
    """Token ids greedy decoding must never pick (``generation_config.suppress_tokens``): the embedding
    rows from ``first_unused`` (the tokenizer's, or the original vocabulary's, size) up to ``rows``, and
    the ``special`` ids (``<image>``, ``<pad>``); ``keep`` (end-of-sequence ids) excepted."""
    ids = {*range(first_unused, rows), *(i for i in special if i is not None)} - set(keep)
    return sorted(int(i) for i in ids if 0 <= i < rows)


def _assemble(
    plan: _Plan,
    *,
    overrides: Mapping[str, torch.Tensor] | None,
    lora: _Lora | None,
    image_size: int | None,
    dtype: torch.dtype,
    device: str | torch.device,
    override_source: tuple[str, str] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Build the LlavaForConditionalGeneration, tokenizer and processor of ``plan``.

    ``overrides`` (LLaVA-repository names, e.g. the projector from non_lora_trainables.bin, or a stage-1
    ``mm_projector.bin``) replace tensors of ``plan.weights``; ``override_source`` is ``(flag, file)``
    that a wrong shape among them is reported against (default: ``plan.flag`` and
    non_lora_trainables.bin). ``lora`` factors are merged into their weights as they are assigned.
    """
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    config = plan.config
    strategy = _check_mm_config(config, plan.source, plan.flag)
    vision_config = _clip_vision_config(plan.clip_dir)
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != int(vision_config.hidden_size):
        raise RequestError(
            "--vision-tower",
            f"{plan.clip_dir}: CLIP hidden size {vision_config.hidden_size} does not match the "
            f"checkpoint's mm_hidden_size {mm_hidden}; give the CLIP it was trained with",
        )
    clip_size, patch = int(vision_config.image_size), int(vision_config.patch_size)
    if image_size is None:
        image_size = _scaled_grid(clip_size, patch) * patch if plan.geochat else clip_size
    if image_size < patch or image_size % patch:
        raise RequestError(
            "--image-size", f"{image_size} px is not a multiple of the CLIP patch size {patch}"
        )
    grid = image_size // patch
    vision_config.image_size = image_size
    n_image_tokens = grid * grid + (1 if strategy == "full" else 0)

    tokenizer = _load_tokenizer(plan.tokenizer_dir, plan.flag)
    original_vocab = int(config.get("vocab_size") or len(tokenizer))
    if len(tokenizer) > original_vocab:
        raise RequestError(
            plan.flag,
            f"{plan.tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{original_vocab} rows; use the tokenizer the checkpoint was trained with",
        )
    if len(tokenizer) < original_vocab:
        logger.warning(
            "%s: tokenizer has %d tokens, the model %d rows; <image>/<pad> get ids inside the "
            "original vocabulary",
            plan.tokenizer_dir,
            len(tokenizer),
            original_vocab,
        )
    image_id, pad_id = _add_llava_tokens(tokenizer)
    vocab_size = max(original_vocab, len(tokenizer))
    suppress = unspeakable_ids(original_vocab, vocab_size, image_id, pad_id)

    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(config, plan.arch, vocab_size, pad_id),
        image_token_index=image_id,
        image_seq_length=n_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    with _parameters_on_meta():
        model: Any = LlavaForConditionalGeneration(llava_config)
    layout = _Layout.of(model)
    target_device = torch.device(device)

    def prepare(hf_key: str, tensor: torch.Tensor, origin: str, flag: str | None = None) -> torch.Tensor:
        expected = layout.shapes[hf_key]
        if hf_key in (layout.embed_key, layout.lm_head) and tensor.ndim == 2:
            if tensor.shape[0] != original_vocab:
                raise RequestError(
                    plan.flag,
                    f"{origin}: {hf_key.rsplit('.', 2)[-2]} has {tensor.shape[0]} rows but the config's "
                    f"vocab_size is {original_vocab}",
                )
            if vocab_size > original_vocab:  # rows of <image>/<pad>: the mean of the original rows
                wide = tensor.to(torch.float32)  # the mean in float32, rounded once to ``dtype`` below
                mean = wide.mean(dim=0, keepdim=True)
                tensor = torch.cat([wide, mean.expand(vocab_size - original_vocab, -1)], dim=0)
        if tuple(tensor.shape) != tuple(expected):
            flag = flag or ("--vision-tower" if hf_key.startswith(layout.vision_prefix) else plan.flag)
            raise RequestError(
                flag,
                f"{origin}: tensor for {hf_key} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected)} (does the checkpoint match its config.json / the base LM?)",
            )
        factors = lora.factors.get(hf_key) if lora is not None else None
        if factors is not None:
            lora_a, lora_b = factors
            delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
            tensor = tensor.to(torch.float32) + lora.scale(lora_a.shape[0]) * delta  # type: ignore[union-attr]
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(target_device)

    filled: set[str] = set()
    ignored: list[str] = []
    n_vision_ignored = 0

    def assign(batch: dict[str, torch.Tensor]) -> None:
        if batch:
            result = model.load_state_dict(batch, strict=False, assign=True)
            if result.unexpected_keys:
                raise ModelError(f"transformers refused keys {result.unexpected_keys[:5]}")
            filled.update(batch)

    # 1. Language model (+ projector) shard by shard; overridden keys are skipped here.
    override_keys = set(overrides or {})
    for path in plan.weights:
        batch: dict[str, torch.Tensor] = {}
        for key, tensor in _iter_tensors(path):
            kind, hf_key = layout.from_llava_repo(key)
            if kind == "vision":
                n_vision_ignored += 1
                continue
            if kind == "buffer":
                continue
            if hf_key is None or hf_key not in layout.shapes:
                ignored.append(key)
                continue
            if key in override_keys:
                continue
            batch[hf_key] = prepare(hf_key, tensor, str(path))
        assign(batch)
        del batch
        logger.debug("loaded %s", path.name)
    # 2. Overrides (non_lora_trainables.bin, or --projector).
    override_flag, override_file = override_source or (None, _NON_LORA)
    batch = {}
    for key, tensor in (overrides or {}).items():
        kind, hf_key = layout.from_llava_repo(key)
        if kind in ("vision", "buffer"):
            continue
        if hf_key is None or hf_key not in layout.shapes:
            ignored.append(key)
            continue
        batch[hf_key] = prepare(hf_key, tensor, override_file, override_flag)
    assign(batch)
    # 3. Vision tower: stock CLIP, position table interpolated once when the input is larger.
    pos_key = layout.vision_prefix + "embeddings.position_embedding.weight"
    for path in weight_files(plan.clip_dir, "--vision-tower"):
        batch = {}
        for key, tensor in _iter_tensors(path):
            hf_key = layout.from_clip(key)
            if hf_key is None:
                continue
            if hf_key not in layout.shapes:
                ignored.append(f"{plan.clip_dir.name}:{key}")
                continue
            if hf_key == pos_key and tensor.shape[0] != grid * grid + 1:
                tensor = interpolate_clip_positions(tensor, grid)
                logger.info(
                    "CLIP position table interpolated to a %dx%d grid (bicubic, align_corners=True)",
                    grid,
                    grid,
                )
            batch[hf_key] = prepare(hf_key, tensor, str(path))
        assign(batch)

    if lora is not None:
        unused = sorted(set(lora.factors) - filled)
        if unused:
            raise RequestError(
                "--adapter", f"LoRA targets modules the model has no weights for: {unused[:5]}"
            )
    output = model.get_output_embeddings()
    if bool(config.get("tie_word_embeddings", False)) and output.weight.device.type == "meta":
        # A tied checkpoint stores no lm_head.weight: the output layer is the embedding (with its padded
        # rows), as transformers' converter clones it (models.md 5.1).
        output.weight = model.get_input_embeddings().weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ModelError(
            f"{plan.source}: {len(missing)} model tensor(s) were not in the checkpoint, e.g. {missing[:5]}"
        )
    if n_vision_ignored:
        logger.info(
            "ignored %d vision-tower tensors stored in the checkpoint (CLIP comes from %s)",
            n_vision_ignored,
            plan.clip_dir,
        )
    if ignored:
        logger.warning("checkpoint tensors with no place in the model (ignored): %s", ignored[:20])

    model.to(target_device)  # the buffers; parameters are already there
    model.eval()
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        suppress_tokens=suppress,
        do_sample=False,
    )
    processor = _make_processor(tokenizer, image_size, patch, strategy)
    info: dict[str, Any] = {
        "image_size": image_size,
        "n_image_tokens": n_image_tokens,
        "image_aspect_ratio": _aspect_of(config),
        "original_vocab_size": original_vocab,
        "suppress_token_ids": suppress,
        "image_token_id": image_id,
        "pad_token_id": pad_id,
        "vision_tower": str(plan.clip_dir),
        "ignored_keys": ignored,
        "text_arch": plan.arch,
    }
    return model, processor, info


def _make_processor(tokenizer: Any, image_size: int, patch: int, strategy: str) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


# ---------------------------------------------------------------------------------------- loaders


def _refuse_format(fmt: str, root: Path, flag: str) -> None:
    reasons = {
        "hf-llava": "is already a transformers LLaVA checkpoint; load it directly (no conversion needed)",
        "peft": "is a PEFT adapter; pass it as --adapter with its base as --model",
        "llava-repo-lora": (
            "is a LLaVA-repository LoRA adapter; pass it as --adapter and its base LM as --model"
        ),
        "bare-lm": "config.json has no mm_vision_tower / mm_projector_type: not a LLaVA checkpoint",
    }
    raise RequestError(flag, f"{root}: {reasons[fmt]}")


_PROJECTOR_KEYS = tuple(f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
"""LLaVA's ``mlp2x_gelu`` projector in a stage-1 ``mm_projector.bin`` (models.md 5.1)."""


def read_projector(path: str | os.PathLike[str], flag: str = "--projector") -> dict[str, torch.Tensor]:
    """A stage-1 projector file as LLaVA-repository tensors ``model.mm_projector.{0,2}.{weight,bias}``.

    LLaVA's stage-1 release (``llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin``, what
    GeoChat's ``--pretrain_mm_mlp_adapter`` loads) has exactly those keys; rsflow's stage-1 export
    writes them too (``export/llava_repo/mm_projector.bin``), and its ``projector.safetensors`` the
    transformers names (``model.multi_modal_projector.linear_{1,2}.*``), which are accepted as well.

    Raises:
        RequestError: (``flag``) no such file, not a state dict, or not exactly those four tensors.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise RequestError(flag, f"no such file {str(file)!r} (a stage-1 mm_projector.bin)")
    try:
        tensors = dict(_iter_tensors(file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same bad input
        raise RequestError(flag, f"{file}: cannot read it as a state dict: {exc}".replace("\n", " ")) from None
    named = {hf_to_llava_repo(k) if "multi_modal_projector" in k else k: v for k, v in tensors.items()}
    if set(named) != set(_PROJECTOR_KEYS):
        raise RequestError(
            flag,
            f"{file}: expected the projector tensors {', '.join(_PROJECTOR_KEYS)}, found "
            f"{', '.join(sorted(map(str, tensors))[:8]) or 'none'}",
        )
    return named


def load_llava_repo(
    path: str | os.PathLike[str],
    *,
    vision_tower: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    prompt_format: str | None = None,
    projector: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load a full LLaVA-repository checkpoint (GeoChat-7B, llava-v1.5-7b) as a transformers LLaVA.

    Args:
        path: the checkpoint folder (``"llava-repo"`` format).
        vision_tower: local CLIP folder; None: the config's ``mm_vision_tower`` if it is local.
        dtype: parameter dtype (checkpoint tensors are cast; the CLIP position table is interpolated
            in float32 first).
        device: where the parameters are placed as they are loaded.
        image_size: model input side in pixels; None: 504 for GeoChat (``model_type`` geochat: the
            CLIP's grid times 3/2, i.e. 504 for the 336-px CLIP), else the CLIP's own size.
        prompt_format: override of the prompt format recorded in ``info``.
        projector: a stage-1 projector file (:func:`read_projector`) that replaces the checkpoint's
            projector: GeoChat's recipe starts stage 2 from LLaVA-v1.5-7B with LLaVA's stage-1
            projector loaded into it (``--pretrain_mm_mlp_adapter``, models.md 3.7).

    Returns:
        ``(model, processor, info)``: a ``LlavaForConditionalGeneration`` in eval mode, a
        ``LlavaProcessor`` (tokenizer padding on the left), and a dict with ``format``,
        ``prompt_format`` (``"geochat"`` for model_type geochat, else ``"llava"``), ``image_size``,
        ``n_image_tokens``, ``image_aspect_ratio`` (:func:`_aspect_of`),
        ``original_vocab_size``, ``suppress_token_ids``, ``image_token_id``, ``pad_token_id``,
        ``vision_tower``, ``source``, ``ignored_keys``, ``text_arch``.

    Raises:
        RequestError: (``--model`` / ``--vision-tower`` / ``--image-size``) a missing or mismatched
            file, key or shape, or an unsupported LLaVA variant.
        ModelError: the files load but do not fill the model.
    """
    root = Path(path).expanduser()
    fmt = detect_format(root, flag="--model")
    if fmt != "llava-repo":
        _refuse_format(fmt, root, "--model")
    config = _read_json(root / _CONFIG, "--model")
    geochat = _is_geochat(config)
    arch: TextArch = "mistral" if str(config.get("model_type")) == "llava_mistral" else "llama"
    plan = _Plan(
        config=config,
        arch=arch,
        weights=tuple(weight_files(root, "--model")),
        tokenizer_dir=root,
        clip_dir=_resolve_vision_tower(config, vision_tower, root),
        geochat=geochat,
        source=root,
        flag="--model",
    )
    overrides = read_projector(projector) if projector is not None else None
    model, processor, info = _assemble(
        plan, overrides=overrides, lora=None, image_size=image_size, dtype=dtype, device=device,
        override_source=("--projector", str(projector)) if projector is not None else None,
    )
    info.update(
        format=fmt,
        source=str(root.resolve()),
        projector=str(Path(projector).expanduser().resolve()) if projector is not None else None,
        adapter=None,
        merged=False,
        prompt_format=_prompt_format_or(prompt_format, "geochat" if geochat else "llava"),
        llava_repo_config=config,
    )
    logger.info("loaded %s (%s, %d px, %s)", root, fmt, info["image_size"], info["prompt_format"])
    return model, processor, info


def _read_lora(
    adapter_dir: Path, adapter_config: Mapping[str, Any]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors ``(A, B)`` keyed by LLaVA-repository module name, after checking the settings."""
    problems = []
    if str(adapter_config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {adapter_config.get('peft_type')!r}")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if adapter_config.get(key):
            problems.append(f"{key} true")
    if adapter_config.get("alpha_pattern"):
        problems.append("alpha_pattern")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter_config['modules_to_save']}")
    if str(adapter_config.get("bias", "none")) != "none":
        problems.append(f"bias {adapter_config['bias']!r}")
    if problems:
        raise RequestError("--adapter", f"{adapter_dir}: unsupported adapter settings: {', '.join(problems)}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in _iter_tensors(_adapter_weights(adapter_dir, "--adapter")):
        name = key.removeprefix("base_model.model.")
        match = _LORA_KEY.match(name)
        if match is None:
            others.append(key)
            continue
        pairs.setdefault(match.group("module"), {})[match.group("which")] = tensor
    if others:
        raise RequestError("--adapter", f"{adapter_dir}: adapter tensors that are not LoRA A/B: {others[:5]}")
    factors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise RequestError("--adapter", f"{adapter_dir}: {module} has lora_{''.join(ab)} only")
        factors[module] = (ab["A"], ab["B"])
    if not factors:
        raise RequestError("--adapter", f"{adapter_dir}: adapter_model holds no LoRA tensors")
    return factors


def _strip_non_lora(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA builder's renaming of non_lora_trainables keys (models.md 4.2 step 3)."""
    renamed = {(k.removeprefix("base_model.")): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in renamed):
        renamed = {(k.removeprefix("model.")): v for k, v in renamed.items()}
    return renamed


def _rsllava_like(adapter_dir: Path, adapter_config: Mapping[str, Any], arch: TextArch) -> bool:
    names = f"{adapter_dir.name} {adapter_config.get('base_model_name_or_path', '')}".lower()
    squashed = re.sub(r"[^a-z]", "", names)
    return arch == "mistral" or "rsllava" in squashed or "neuralchat" in squashed


def load_llava_repo_lora(
    adapter_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
    *,
    vision_tower: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    merge: bool = True,
    image_size: int | None = None,
    prompt_format: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Apply a LLaVA-repository LoRA adapter (RS-LLaVA) to its bare base LM, as LLaVA's builder does.

    Steps (models.md 4.2): the language model is built with the ADAPTER's config.json dimensions
    (they must equal the base's) from the base's weights (a Llama or Mistral causal LM, or a full
    LLaVA-repository model); ``non_lora_trainables.bin`` (keys stripped of ``base_model.`` and then
    one ``model.``) replaces what it holds (the projector); the vision tower is the stock CLIP; then
    every LoRA pair is either merged, ``W += (alpha / r) · B · A`` (``alpha / sqrt(r)`` with
    rsLoRA), computed in float32 (``merge=True``), or loaded into a ``peft.PeftModel`` (``merge=False``).

    The tokenizer is the BASE's (for RS-LLaVA neural-chat's), plus ``<image>`` and ``<pad>``.
    ``prompt_format`` rule: ``"rsllava"`` when the base is Mistral-architecture (RS-LLaVA's
    neural-chat base) or the adapter folder / its ``base_model_name_or_path`` names RS-LLaVA or
    neural-chat; ``"geochat"`` when the adapter config's model_type is geochat; else ``"llava"``.

    Args:
        adapter_dir: the adapter folder (``"llava-repo-lora"`` format).
        base_dir: the base LM folder (``--model``).
        vision_tower: local CLIP folder; None: the adapter config's ``mm_vision_tower`` if local.
        dtype: parameter dtype.
        device: parameter device.
        merge: merge the LoRA into the weights (True) or return a ``PeftModel`` (False).
        image_size: model input side override in pixels.
        prompt_format: override of the rule above.

    Returns:
        ``(model, processor, info)`` as ``load_llava_repo``; ``model`` is a ``PeftModel`` wrapping
        the LLaVA when ``merge`` is False; ``info`` adds ``adapter``, ``merged`` and ``lora``
        (``r``, ``alpha``, ``modules``).

    Raises:
        RequestError: (``--adapter`` / ``--model`` / ``--vision-tower``) no base, a base whose
            dimensions differ from the adapter's, missing files, unsupported adapter settings.
        ModelError: the files load but do not fill the model.
    """
    adapter_root = Path(adapter_dir).expanduser()
    fmt = detect_format(adapter_root, flag="--adapter")
    if fmt != "llava-repo-lora":
        raise RequestError(
            "--adapter",
            f"{adapter_root} is a {fmt!r} folder, not a LLaVA-repository LoRA adapter "
            "(adapter_config.json + adapter_model.bin + non_lora_trainables.bin + config.json)",
        )
    config = _read_json(adapter_root / _CONFIG, "--adapter")
    adapter_config = _read_json(adapter_root / _ADAPTER_CONFIG, "--adapter")
    if base_dir is None:
        raise RequestError(
            "--model",
            f"the LLaVA-repository LoRA adapter {adapter_root} needs its base language model: pass "
            f"--model BASE_DIR (adapter_config.json names {adapter_config.get('base_model_name_or_path')!r})",
        )
    base_root = Path(base_dir).expanduser()
    base_fmt = detect_format(base_root, flag="--model")
    if base_fmt not in ("bare-lm", "llava-repo"):
        raise RequestError(
            "--model",
            f"{base_root} is a {base_fmt!r} folder; the adapter's base must be the bare language model "
            "(a Llama/Mistral folder) or a LLaVA-repository model",
        )
    base_config = _read_json(base_root / _CONFIG, "--model")
    for key in _TEXT_KEYS:
        ours = base_config.get(key) or (
            base_config.get("num_attention_heads") if key == "num_key_value_heads" else None
        )
        theirs = config.get(key) or (
            config.get("num_attention_heads") if key == "num_key_value_heads" else None
        )
        if ours != theirs:
            raise RequestError(
                "--model",
                f"{base_root}: base {key.replace('_', ' ')} {ours} does not match the adapter's {theirs} "
                f"({adapter_root}/config.json); give the base LM the adapter was trained on "
                f"({adapter_config.get('base_model_name_or_path')!r})",
            )
    arch: TextArch = _bare_lm_arch(base_config) or "llama"
    if base_fmt == "llava-repo" and str(base_config.get("model_type")) == "llava_mistral":
        arch = "mistral"
    geochat = str(config.get("model_type")) == "geochat"
    plan = _Plan(
        config=config,
        arch=arch,
        weights=tuple(weight_files(base_root, "--model")),
        tokenizer_dir=base_root,
        clip_dir=_resolve_vision_tower(config, vision_tower, adapter_root),
        geochat=geochat,
        source=base_root,
        flag="--model",
    )
    overrides = _strip_non_lora(_torch_load(adapter_root / _NON_LORA))
    raw_factors = _read_lora(adapter_root, adapter_config)
    # Map module names onto the transformers layout with the same rule as the weights.
    probe = _probe_layout()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in raw_factors.items():
        kind, hf_key = probe.from_llava_repo(module + ".weight")
        if kind != "lm" or hf_key is None:
            raise RequestError(
                "--adapter",
                f"{adapter_root}: LoRA on {module!r} is not supported (only language-model layers)",
            )
        factors[hf_key] = pair
    lora = _Lora(
        factors=factors,
        alpha=float(adapter_config.get("lora_alpha", 8)),
        use_rslora=bool(adapter_config.get("use_rslora", False)),
        config=adapter_config,
    )
    model, processor, info = _assemble(
        plan,
        overrides=overrides,
        lora=lora if merge else None,
        image_size=image_size,
        dtype=dtype,
        device=device,
    )
    ranks = sorted({int(a.shape[0]) for a, _ in factors.values()})
    if not merge:
        model = _wrap_peft(model, lora, torch.device(device))
    default_format = (
        "rsllava" if _rsllava_like(adapter_root, adapter_config, arch) else "geochat" if geochat else "llava"
    )
    info.update(
        format=fmt,
        source=str(base_root.resolve()),
        adapter=str(adapter_root.resolve()),
        merged=merge,
        prompt_format=_prompt_format_or(prompt_format, default_format),
        lora={"r": ranks, "alpha": lora.alpha, "modules": len(factors)},
        llava_repo_config=config,
        llava_repo_adapter_config=adapter_config,
    )
    logger.info(
        "loaded %s on base %s (%d LoRA modules, %s, %s)",
        adapter_root,
        base_root,
        len(factors),
        "merged" if merge else "unmerged",
        info["prompt_format"],
    )
    return model, processor, info


def _probe_layout() -> _Layout:
    """The layout of this transformers' LLaVA, from a 1-layer meta model (no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=8,
            patch_size=4,
        ),
        text_config=LlamaConfig(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
        ),
    )
    with torch.device("meta"):
        return _Layout.of(LlavaForConditionalGeneration(config))


def _peft_targets(modules: list[str], lm_prefix: str) -> str | list[str]:
    """A compact ``target_modules`` regex when ``modules`` are whole leaf-name sets, else the list."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    pattern = re.escape(lm_prefix) + r"layers\.\d+\.[^.]+\.(" + "|".join(map(re.escape, leaves)) + ")"
    return pattern if all(re.fullmatch(pattern, m) for m in modules) else sorted(modules)


def _wrap_peft(model: Any, lora: _Lora, device: torch.device) -> Any:
    """Wrap a loaded LLaVA into a PeftModel holding ``lora`` (unmerged)."""
    import warnings

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    modules = sorted(k[: -len(".weight")] for k in lora.factors)
    layout = _Layout.of(model)
    # A list holds full module names: peft matches them as suffixes, so CLIP's q/k/v_proj stay out.
    targets = _peft_targets(modules, layout.lm_prefix)
    r = int(lora.config.get("r") or next(iter(lora.factors.values()))[0].shape[0])
    rank_pattern = {
        re.escape(k[: -len(".weight")]): int(a.shape[0])
        for k, (a, _) in lora.factors.items()
        if a.shape[0] != r
    }
    peft_config = LoraConfig(
        r=r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft types it int; floats work
        lora_dropout=float(lora.config.get("lora_dropout", 0.0)),
        target_modules=targets,
        rank_pattern=rank_pattern,
        use_rslora=lora.use_rslora,
        bias="none",
        init_lora_weights=True,
    )
    with warnings.catch_warnings():
        # peft 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    state = {}
    for key, (lora_a, lora_b) in lora.factors.items():
        module = "base_model.model." + key[: -len(".weight")]
        # Keep the adapter's own dtype (peft casts inputs to it), so a convert/export round trip is exact.
        layer: Any = peft_model.get_submodule(module)
        layer.lora_A["default"].to(dtype=lora_a.dtype)
        layer.lora_B["default"].to(dtype=lora_b.dtype)
        state[module + ".lora_A.weight"] = lora_a.to(device)
        state[module + ".lora_B.weight"] = lora_b.to(device)
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ModelError(
            f"peft did not take the LoRA tensors: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    peft_model.eval()
    return peft_model


def describe_original(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    vision_tower: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """What an original LLaVA-repository checkpoint will run as, from its JSON files alone (no weights).

    Returns:
        None when neither folder is in an original format (a transformers LLaVA, a PEFT adapter, a hub
        id); else ``format``, ``image_size`` (504 for GeoChat: 3/2 of the CLIP's grid; else the CLIP's),
        ``prompt_format`` (the loaders' rules) and ``image_aspect_ratio`` (:func:`_aspect_of`).

    Raises:
        RequestError: the folders are incomplete, or the vision tower cannot be found (``--vision-tower``).
    """
    model_root = Path(model_dir).expanduser()
    if not model_root.is_dir():
        return None
    adapter_root = Path(adapter_dir).expanduser() if adapter_dir is not None else None
    if adapter_root is not None and adapter_root.is_dir() and detect_format(adapter_root, flag="--adapter") == "llava-repo-lora":
        config = _read_json(adapter_root / _CONFIG, "--adapter")
        adapter_config = _read_json(adapter_root / _ADAPTER_CONFIG, "--adapter")
        base_config = _read_json(model_root / _CONFIG, "--model")
        arch: TextArch = _bare_lm_arch(base_config) or (
            "mistral" if str(base_config.get("model_type")) == "llava_mistral" else "llama"
        )
        geochat = str(config.get("model_type")) == "geochat"
        fmt = "llava-repo-lora"
        prompt = "rsllava" if _rsllava_like(adapter_root, adapter_config, arch) else ("geochat" if geochat else "llava")
        source = adapter_root
    else:
        model_fmt = detect_format(model_root, flag="--model")
        if model_fmt in ("llava-repo-lora", "peft"):
            raise RequestError(
                "--model",
                f"{model_root} is a LoRA adapter ({model_fmt}); pass it as --adapter and its base model as --model",
            )
        if model_fmt != "llava-repo":
            return None
        config = _read_json(model_root / _CONFIG, "--model")
        geochat = _is_geochat(config)
        fmt, prompt, source = "llava-repo", ("geochat" if geochat else "llava"), model_root
    clip = _clip_vision_config(_resolve_vision_tower(config, vision_tower, source))
    size, patch = int(clip.image_size), int(clip.patch_size)
    return {
        "format": fmt,
        "image_size": _scaled_grid(size, patch) * patch if geochat else size,
        "prompt_format": prompt,
        "image_aspect_ratio": _aspect_of(config),
    }


def _aspect_of(config: Mapping[str, Any]) -> str:
    """How an original checkpoint's tiles reach the processor: ``"pad"`` (padded to a square first) only
    where its config says ``image_aspect_ratio: "pad"``; LLaVA's builder hands any other value, or none,
    straight to the processor, whose shortest-edge resize and centre crop is ``"crop"``."""
    return "pad" if config.get("image_aspect_ratio") == "pad" else "crop"


def load_original(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    vision_tower: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    merge: bool = True,
    image_size: int | None = None,
    prompt_format: str | None = None,
    projector: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """``load_llava_repo`` or ``load_llava_repo_lora``, chosen by the folders' formats (``projector``:
    see ``load_llava_repo``; a LoRA adapter brings its own in non_lora_trainables.bin).

    ``--model DIR`` alone: a ``"llava-repo"`` model. ``--model BASE --adapter LORA``: a
    ``"llava-repo-lora"`` adapter on its base. A LoRA folder given as ``--model`` is refused with
    a message saying to pass it as ``--adapter``.

    Raises:
        RequestError: see the two loaders; also a transformers-format PEFT adapter here.
    """
    if adapter_dir is None:
        return load_llava_repo(
            model_dir,
            vision_tower=vision_tower,
            dtype=dtype,
            device=device,
            image_size=image_size,
            prompt_format=prompt_format,
            projector=projector,
        )
    if projector is not None:
        raise RequestError(
            "--projector",
            "replaces a full LLaVA-repository model's projector; a LoRA adapter brings its own "
            "(non_lora_trainables.bin): drop --projector or --adapter",
        )
    adapter_fmt = detect_format(adapter_dir, flag="--adapter")
    if adapter_fmt != "llava-repo-lora":
        raise RequestError(
            "--adapter",
            f"{adapter_dir} is a {adapter_fmt!r} folder; only a LLaVA-repository LoRA adapter "
            "(with non_lora_trainables.bin) is loaded from original files (a transformers-format "
            "PEFT adapter goes on a converted model)",
        )
    return load_llava_repo_lora(
        adapter_dir,
        model_dir,
        vision_tower=vision_tower,
        dtype=dtype,
        device=device,
        merge=merge,
        image_size=image_size,
        prompt_format=prompt_format,
    )


# ---------------------------------------------------------------------------------------- convert


def _config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    value = getattr(torch, str(name), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return fn(*args, **kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


_TOWER = "vision_tower."
_TOWER_HF = "vision_tower.vision_model."


def _llava_hf_name(name: str) -> str:
    """``vision_tower.X`` (transformers 5's saved name) -> ``vision_tower.vision_model.X`` (llava-hf's)."""
    if name.startswith(_TOWER) and not name.startswith(_TOWER_HF):
        return _TOWER_HF + name[len(_TOWER):]
    return name


def _rename_safetensors(path: Path) -> int:
    """Rename the tensors of one safetensors file to :func:`_llava_hf_name`: only its JSON header changes
    (data offsets are relative to the data), so the tensor bytes are copied through in chunks, never
    loaded; the file is replaced whole. Returns how many names changed."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        renamed = {(k if k == "__metadata__" else _llava_hf_name(k)): v for k, v in header.items()}
        changed = sum(1 for k in header if k != "__metadata__" and _llava_hf_name(k) != k)
        if not changed:
            return 0
        blob = json.dumps(renamed, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section stays 8-byte aligned
        tmp = path.with_name(f".{path.name}.renaming")
        with tmp.open("wb") as g:
            g.write(struct.pack("<Q", len(blob)))
            g.write(blob)
            shutil.copyfileobj(f, g, 16 * 2**20)
    os.replace(tmp, path)
    return changed


def write_llava_hf_layout(folder: str | os.PathLike[str]) -> int:
    """Give a saved transformers LLaVA folder the llava-hf tensor names of its CLIP tower.

    transformers 5's ``save_pretrained`` names the tower's tensors ``vision_tower.embeddings...``;
    the published llava-hf checkpoints (and vLLM 0.29's LLaVA loader, ``--engine vllm``) name them
    ``vision_tower.vision_model.embeddings...``. transformers loads both to the same model, so the
    folders rsflow writes (:func:`save_llava_hf`: ``rsflow convert``, stage 1's export, the smoke and
    demo models) use the published names and load in either engine. Renames the safetensors headers and
    the index in place; returns the tensors renamed.
    """
    root = Path(folder)
    n = sum(_rename_safetensors(p) for p in weight_files(root) if p.suffix == ".safetensors")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_llava_hf_name(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return n


def save_llava_hf(model: Any, folder: str | os.PathLike[str]) -> None:
    """``model.save_pretrained(folder)`` as safetensors (no progress bar), then
    :func:`write_llava_hf_layout`: how every LLaVA folder rsflow writes is saved, so that it loads in
    transformers and in ``--engine vllm`` alike."""
    _quiet(model.save_pretrained, folder, safe_serialization=True)
    write_llava_hf_layout(folder)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    merge_lora: bool = False,
    vision_tower: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    prompt_format: str | None = None,
    projector: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write an original checkpoint as a transformers LLaVA folder that ``--model DST`` loads.

    ``dst`` receives ``save_pretrained`` safetensors, ``generation_config.json`` (with
    ``suppress_tokens``), the processor and tokenizer (``tokenizer.json``, so later loads need no
    sentencepiece), and ``rsflow.json`` (``prompt_format``, ``image_size``, ``image_aspect_ratio``,
    ``source_format``, ``suppress_token_ids``, ``original_vocab_size``, and the original configs so
    ``export_llava_repo_lora`` can write them back).

    For a LoRA source (``adapter`` = a LLaVA-repository LoRA folder, ``src`` = its base LM):
    ``merge_lora=True`` merges it into the saved weights; otherwise ``dst`` holds the UNMERGED base
    with the adapter's projector (non_lora_trainables.bin) already in
    ``multi_modal_projector.linear_{1,2}`` and ``dst/adapter`` holds a transformers-format PEFT
    adapter (``PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(dst),
    dst/adapter)``), i.e. ``--model DST --adapter DST/adapter``.

    Args:
        src: a ``"llava-repo"`` model, or the base LM of ``adapter``.
        dst: the output folder (must not exist or be empty).
        adapter: a ``"llava-repo-lora"`` adapter folder.
        merge_lora: merge the adapter into the weights.
        vision_tower: local CLIP folder (see ``load_llava_repo``).
        dtype: saved dtype; None: the source config's ``torch_dtype`` (float16 for the published
            models), float32 if it has none.
        image_size: input side override in pixels.
        prompt_format: override of the recorded prompt format.
        projector: a stage-1 projector file put in place of the model's (``load_llava_repo``): the
            base of GeoChat's stage-2 recipe is LLaVA-v1.5-7B with LLaVA's stage-1 projector.

    Returns:
        The load ``info`` plus ``dst`` and ``adapter_dir`` (None unless an unmerged adapter was written).

    Raises:
        RequestError: bad inputs (see the loaders), ``dst`` not empty, or a ``"llava-repo-lora"``
            ``src`` without a base.
    """
    src_root, out = Path(src).expanduser(), Path(dst).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RequestError("DST", f"{out} exists and is not an empty folder; choose a new output folder")
    if merge_lora and adapter is None:
        raise RequestError("--merge-lora", "merges a LoRA adapter into its base: give the adapter as --adapter")
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise RequestError("--adapter", f"no such folder {str(adapter)!r}")
    src_fmt = detect_format(src_root, flag="--model")
    if adapter is None and src_fmt == "llava-repo-lora":
        raise RequestError(
            "--model",
            f"{src_root} is a LLaVA-repository LoRA adapter: pass it as --adapter and its base LM as --model",
        )
    source_config = _read_json(
        (Path(adapter).expanduser() if adapter is not None else src_root) / _CONFIG,
        "--adapter" if adapter is not None else "--model",
    )
    save_dtype = dtype or _config_dtype(source_config)
    model, processor, info = load_original(
        src_root,
        adapter,
        vision_tower=vision_tower,
        dtype=save_dtype,
        merge=merge_lora or adapter is None,
        image_size=image_size,
        prompt_format=prompt_format,
        projector=projector,
    )
    # Written into a hidden sibling and renamed onto DST at the end: a convert killed half-way leaves no
    # DST folder that looks like a model (a 0-byte processor_config.json failed the region job later, and
    # the rerun was refused for a DST that was not empty).
    final = out
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.converting-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    try:
        return _write_converted(model, processor, info, src_root, out, final, adapter, merge_lora, save_dtype)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_converted(
    model: Any, processor: Any, info: dict[str, Any], src_root: Path, out: Path, final: Path,
    adapter: str | os.PathLike[str] | None, merge_lora: bool, save_dtype: Any,
) -> dict[str, Any]:
    """:func:`convert`'s writing, into ``out``, then ``out`` renamed onto ``final``."""
    adapter_out: Path | None = None
    if adapter is not None and not merge_lora:
        adapter_out = out / ADAPTER_SUBDIR
        model.peft_config["default"].base_model_name_or_path = str(final.resolve())
        # The adapter adapts no embedding: skip peft's vocabulary check against a base not yet written.
        _quiet(model.save_pretrained, adapter_out, safe_serialization=True, save_embedding_layers=False)
        model = model.unload()  # the base LLaVA without LoRA layers
    save_llava_hf(model, out)
    processor.save_pretrained(out)
    card = {
        "kind": "converted",
        "name": (Path(adapter).name if adapter is not None else src_root.name),
        "prompt_format": info["prompt_format"],
        "image_size": info["image_size"],
        "image_aspect_ratio": info["image_aspect_ratio"],
        "source_format": info["format"],
        "source": info["source"],
        "adapter": info.get("adapter"),
        "projector": info.get("projector"),
        "merged_lora": bool(adapter is not None and merge_lora),
        "vision_tower": info["vision_tower"],
        "original_vocab_size": info["original_vocab_size"],
        "suppress_token_ids": info["suppress_token_ids"],
        "dtype": str(save_dtype).removeprefix("torch."),
        "llava_repo_config": info.get("llava_repo_config"),
        "llava_repo_adapter_config": info.get("llava_repo_adapter_config"),
    }
    (out / CARD_FILENAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if final.exists():
        final.rmdir()  # empty (checked before the model was loaded)
    os.replace(out, final)
    adapter_final = final / ADAPTER_SUBDIR if adapter_out else None
    logger.info("converted %s -> %s%s", src_root, final, f" (+ adapter {adapter_final})" if adapter_final else "")
    return {**info, "dst": str(final), "adapter_dir": str(adapter_final) if adapter_final else None}


def _read_weights_dir(folder: Path, flag: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in weight_files(folder, flag):
        yield from _iter_tensors(path)


def export_llava_repo_lora(
    peft_adapter_dir: str | os.PathLike[str],
    llava_dir: str | os.PathLike[str],
    dst: str | os.PathLike[str],
) -> dict[str, Any]:
    """Write a transformers-format PEFT adapter of a LLaVA back in LLaVA-repository LoRA format.

    Output (``dst``, must not exist or be empty): ``adapter_model.bin`` (keys
    ``base_model.model.model.layers.{i}....lora_{A,B}.weight``, tensors as stored),
    ``non_lora_trainables.bin`` (the projector the adapter carries (peft ``modules_to_save``), else the
    one of ``llava_dir``, keys
    ``base_model.model.model.mm_projector.{0,2}.{weight,bias}``), ``adapter_config.json`` (the
    original one recorded by ``convert`` when there is one, with ``r``, ``lora_alpha``,
    ``lora_dropout`` and ``target_modules`` (leaf names) from the PEFT adapter) and ``config.json``
    (the original LLaVA config recorded by ``convert``, else one rebuilt from ``llava_dir``).

    Args:
        peft_adapter_dir: the PEFT adapter (e.g. ``convert``'s ``dst/adapter`` or a finetuning output).
        llava_dir: the transformers LLaVA folder the adapter applies to.
        dst: the output folder.

    Returns:
        ``{"dst", "adapter_keys", "non_lora_keys"}``.

    Raises:
        RequestError: missing files, an adapter key with no LLaVA-repository name, ``dst`` not empty.
    """
    adapter_root, llava_root, out = (Path(p).expanduser() for p in (peft_adapter_dir, llava_dir, dst))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RequestError("DST", f"{out} exists and is not an empty folder; choose a new output folder")
    if detect_format(adapter_root, flag="--adapter") != "peft":
        raise RequestError("--adapter", f"{adapter_root} is not a transformers-format PEFT adapter")
    if detect_format(llava_root, flag="--model") != "hf-llava":
        raise RequestError("--model", f"{llava_root} is not a transformers LLaVA folder")
    peft_config = _read_json(adapter_root / _ADAPTER_CONFIG, "--adapter")

    adapter_state: dict[str, torch.Tensor] = {}
    trained_projector: dict[str, torch.Tensor] = {}
    leaves: set[str] = set()
    for key, tensor in _iter_tensors(_adapter_weights(adapter_root, "--adapter")):
        name = key.removeprefix("base_model.model.")
        match = _LORA_KEY.match(name)
        if match is None and (hf_to_llava_repo(name) or "").startswith("model.mm_projector."):
            # a projector trained with the LoRA (peft modules_to_save): LLaVA keeps it in non_lora_trainables
            trained_projector["base_model.model." + str(hf_to_llava_repo(name))] = tensor.contiguous()
            continue
        original = hf_to_llava_repo(match.group("module") + ".weight") if match else None
        if match is None or original is None:
            raise RequestError("--adapter", f"{adapter_root}: {key} has no LLaVA-repository name")
        module = original[: -len(".weight")]
        leaves.add(module.rsplit(".", 1)[-1])
        adapter_state[f"base_model.model.{module}.lora_{match.group('which')}.weight"] = tensor.contiguous()

    non_lora: dict[str, torch.Tensor] = {}
    for key, tensor in _read_weights_dir(llava_root, "--model"):
        original = hf_to_llava_repo(key)
        if original is not None and original.startswith("model.mm_projector."):
            non_lora["base_model.model." + original] = tensor.contiguous()
    if len(non_lora) != 4:
        raise RequestError(
            "--model", f"{llava_root}: expected the 4 projector tensors, found {sorted(non_lora)}"
        )
    if trained_projector and set(trained_projector) != set(non_lora):
        raise RequestError(
            "--adapter", f"{adapter_root}: projector tensors {sorted(trained_projector)} are not the base's {sorted(non_lora)}"
        )
    non_lora.update(trained_projector)

    card_path = llava_root / CARD_FILENAME
    card = _read_json(card_path, "--model") if card_path.is_file() else {}
    adapter_config = dict(
        card.get("llava_repo_adapter_config")
        or {
            "base_model_name_or_path": None,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "modules_to_save": None,
            "peft_type": "LORA",
            "revision": None,
            "task_type": "CAUSAL_LM",
        }
    )
    adapter_config.update(
        r=peft_config.get("r"),
        lora_alpha=peft_config.get("lora_alpha"),
        lora_dropout=peft_config.get("lora_dropout", 0.0),
        target_modules=sorted(leaves),
    )
    config = card.get("llava_repo_config") or _rebuild_llava_repo_config(llava_root, card)

    out.mkdir(parents=True, exist_ok=True)
    torch.save(adapter_state, out / "adapter_model.bin")
    torch.save(non_lora, out / _NON_LORA)
    for name, data in ((_ADAPTER_CONFIG, adapter_config), (_CONFIG, config)):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("exported %d LoRA tensors + projector to %s", len(adapter_state), out)
    return {"dst": str(out), "adapter_keys": sorted(adapter_state), "non_lora_keys": sorted(non_lora)}


def _rebuild_llava_repo_config(llava_root: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """A LLaVA-repository config.json from a transformers LLaVA config (models.md 1.4 keys)."""
    hf = _read_json(llava_root / _CONFIG, "--model")
    text, vision = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
    config = {
        k: text[k]
        for k in (*_TEXT_KEYS, "hidden_act", "max_position_embeddings", "rms_norm_eps")
        if k in text
    }
    rope = text.get("rope_parameters") or {}
    config.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava",
        vocab_size=int(card.get("original_vocab_size") or text.get("vocab_size") or 0),
        rope_theta=rope.get("rope_theta", 10000.0),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        mm_vision_tower=card.get("vision_tower") or "openai/clip-vit-large-patch14-336",
        mm_hidden_size=vision.get("hidden_size"),
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf.get("vision_feature_layer", -2),
        mm_vision_select_feature="cls_patch"
        if hf.get("vision_feature_select_strategy") == "full"
        else "patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio=card.get("image_aspect_ratio", "pad"),
        use_mm_proj=True,
    )
    return config
