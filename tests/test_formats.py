"""Original LLaVA-repository checkpoints (GeoChat, LLaVA-1.5, RS-LLaVA LoRA): detection, loading, conversion.

The parity tests compare rsflow's loaders with an INDEPENDENT reference forward written here from
the reference description (models.md 1-5): it reads the original files with ``torch.load`` /
safetensors, runs CLIP layer -2 without CLS (GeoChat: its own bicubic align_corners=True table),
the two-layer GELU projector from the checkpoint tensors, a Llama/Mistral causal LM built from the
checkpoint tensors (LoRA merged here as W + (alpha/r)·B·A), and tokenises like LLaVA's
``tokenizer_image_token`` with the ``sentencepiece`` package itself. None of rsflow's loading or
conversion code is called by the reference.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rsflow.errors import RequestError
from rsflow.models.formats import (
    convert,
    detect_format,
    export_llava_repo_lora,
    interpolate_clip_positions,
    llava_chunked_ids,
    load_llava_repo,
    load_llava_repo_lora,
    load_original,
)
from rsflow.models.spec import ModelSpec, model_input_size, resolve_prompt_format
from tests.original_formats import (
    CLIP_IMAGE_SIZE,
    CLIP_PATCH,
    GEOCHAT_IMAGE_SIZE,
    OPENAI_CLIP_ID,
    write_clip,
    write_llava_repo,
    write_llava_repo_lora,
    write_mistral_base,
)

pytest.importorskip("sentencepiece")

SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_RSLLAVA = (
    "The assistant provides helpful, detailed, and polite responses to the human's questions. If the "
    "assistant is unsure about the answer, it will respectfully communicate, 'I'm sorry, I do not know "
    "the answer' to maintain clarity and honesty in the interaction."
)
N_NEW_TOKENS = 6
ATOL = 1e-4


@dataclass(frozen=True)
class Originals:
    root: Path
    clip: Path
    llava15: Path
    geochat: Path
    base: Path
    lora: Path


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    root = tmp_path_factory.mktemp("originals")
    clip = write_clip(root / "clip-vit-tiny")
    base = write_mistral_base(root / "neural-chat-tiny")
    return Originals(
        root=root,
        clip=clip,
        # LLaVA-1.5: mm_vision_tower is a local folder, a single pytorch_model.bin.
        llava15=write_llava_repo(root / "llava-v1.5-tiny", vision_tower=str(clip), n_shards=1, seed=10),
        # GeoChat: hub id in the config (needs --vision-tower), two shards + index.
        geochat=write_llava_repo(root / "geochat-tiny", vision_tower=OPENAI_CLIP_ID, geochat=True, seed=20),
        base=base,
        lora=write_llava_repo_lora(
            root / "RS-llava-v1.5-tiny-LoRA", base_dir=base, vision_tower=OPENAI_CLIP_ID
        ),
    )


# ---------------------------------------------------------------------------------------- reference


def _ref_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, read directly (index json, torch.load, safetensors)."""
    from safetensors.torch import load_file

    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        if (folder / index_name).is_file():
            files = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in ("pytorch_model.bin", "model.safetensors") if (folder / n).is_file()][:1]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            state.update(load_file(str(folder / name)))
        else:
            state.update(torch.load(folder / name, map_location="cpu", weights_only=True))
    return state


def _ref_vision(clip_dir: Path, image_size: int) -> Any:
    """CLIPVisionModel from the stock CLIP folder; for a larger input, GeoChat's table (models.md 3.2)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig.from_pretrained(clip_dir)
    state = torch.load(clip_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    vision = {
        k[len("vision_model.") :]: v
        for k, v in state.items()
        if k.startswith("vision_model.") and not k.endswith("position_ids")
    }
    if image_size != config.image_size:
        table = vision["embeddings.position_embedding.weight"].float()
        old, new = config.image_size // config.patch_size, image_size // config.patch_size
        grid = table[1:].permute(1, 0).reshape(1, -1, old, old)  # (1, D, 576) -> (1, D, 24, 24)
        grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=True)
        vision["embeddings.position_embedding.weight"] = torch.cat(
            [table[:1], grid.reshape(1, -1, new * new).permute(0, 2, 1)[0]], dim=0
        )
        config.image_size = image_size
    model = CLIPVisionModel(config)
    model.load_state_dict(vision, strict=True)
    return model.eval()


def _ref_lm(config: dict[str, Any], state: dict[str, torch.Tensor], arch: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kwargs = dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=config.get("sliding_window"), **kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    lm = {
        k: v.float()
        for k, v in state.items()
        if (k.startswith(("model.embed_tokens", "model.layers.", "model.norm")) or k == "lm_head.weight")
        and not k.endswith("inv_freq")
    }
    model.load_state_dict(lm, strict=True)
    return model.eval()


def _ref_ids(tokenizer_model: Path, prompt: str) -> tuple[list[int], list[int]]:
    """LLaVA's tokenizer_image_token with SentencePiece itself: ids before / after the one placeholder."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    before, after = prompt.split("<image>")
    return [1, *sp.encode(before)], sp.encode(after)  # the later chunk's BOS is dropped


@dataclass(frozen=True)
class Reference:
    logits: torch.Tensor
    """[L, V] logits over the original vocabulary."""
    ids_before: list[int]
    ids_after: list[int]
    n_image: int
    greedy: list[int]
    text: str
    """SentencePiece's decoding of the greedy tokens that are not byte pieces (byte-fallback runs that
    are not valid UTF-8 decode differently in SentencePiece and in tokenizers: not a model matter)."""
    text_ids: list[int]
    """The greedy ids ``text`` decodes."""


def _reference(case: str, o: Originals, prompt: str, pixels: torch.Tensor) -> Reference:
    import sentencepiece as spm

    if case == "rsllava-lora":
        config = json.loads((o.lora / "config.json").read_text())
        state = _ref_state(o.base)
        adapter_config = json.loads((o.lora / "adapter_config.json").read_text())
        adapter = torch.load(o.lora / "adapter_model.bin", weights_only=True)
        scale = adapter_config["lora_alpha"] / adapter_config["r"]
        for key, lora_a in adapter.items():
            if ".lora_A." in key:
                module = key[len("base_model.model.") : -len(".lora_A.weight")]
                lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
                state[module + ".weight"] = state[module + ".weight"].float() + scale * (
                    lora_b.float() @ lora_a.float()
                )
        non_lora = torch.load(o.lora / "non_lora_trainables.bin", weights_only=True)
        projector = {k[len("base_model.model.model.") :]: v for k, v in non_lora.items()}
        lm, tokenizer_dir, image_size = _ref_lm(config, state, "mistral"), o.base, CLIP_IMAGE_SIZE
    else:
        folder = o.geochat if case == "geochat" else o.llava15
        config = json.loads((folder / "config.json").read_text())
        state = _ref_state(folder)
        projector = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.mm_projector.")}
        lm, tokenizer_dir = _ref_lm(config, state, "llama"), folder
        image_size = GEOCHAT_IMAGE_SIZE if case == "geochat" else CLIP_IMAGE_SIZE
    vision = _ref_vision(o.clip, image_size)
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        x = F.linear(
            hidden, projector["mm_projector.0.weight"].float(), projector["mm_projector.0.bias"].float()
        )
        features = F.linear(
            F.gelu(x), projector["mm_projector.2.weight"].float(), projector["mm_projector.2.bias"].float()
        )[0]
        before, after = _ref_ids(tokenizer_dir / "tokenizer.model", prompt)
        embed = lm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(before)), features, embed(torch.tensor(after))])[None]
        logits = lm(inputs_embeds=embeds).logits[0]
        greedy: list[int] = []
        step_logits = logits
        for _ in range(N_NEW_TOKENS):
            token = int(step_logits[-1].argmax())
            greedy.append(token)
            if token == 2:
                break
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            step_logits = lm(inputs_embeds=embeds).logits[0]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    text_ids = [t for t in greedy if t != 2 and not sp.is_byte(t)]
    return Reference(logits, before, after, int(features.shape[0]), greedy, sp.decode(text_ids), text_ids)


# ---------------------------------------------------------------------------------------- detection


def test_detect_format_of_every_original_and_transformers_layout(
    originals: Originals, tiny_model_dir: Path, tiny_adapter_dir: Path
) -> None:
    assert detect_format(originals.llava15) == "llava-repo"
    assert detect_format(originals.geochat) == "llava-repo"
    assert detect_format(originals.lora, flag="--adapter") == "llava-repo-lora"
    assert detect_format(originals.base) == "bare-lm"
    assert detect_format(tiny_model_dir) == "hf-llava"
    assert detect_format(tiny_adapter_dir, flag="--adapter") == "peft"


def _copy(src: Path, dst: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in drop])
    return dst


def test_missing_shard_names_the_index_and_the_file(originals: Originals, tmp_path: Path) -> None:
    broken = _copy(originals.geochat, tmp_path / "geochat", drop=("pytorch_model-00002-of-00002.bin",))
    with pytest.raises(
        RequestError,
        match=r"^--model: .*pytorch_model\.bin\.index\.json lists pytorch_model-00002-of-00002\.bin, "
        r"which is missing",
    ):
        detect_format(broken)


def test_config_without_mm_keys_is_not_a_llava_checkpoint(originals: Originals, tmp_path: Path) -> None:
    broken = _copy(originals.llava15, tmp_path / "llava")
    config = json.loads((broken / "config.json").read_text())
    for key in ("mm_vision_tower", "mm_projector_type"):
        del config[key]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        RequestError, match=r"^--model: .*no mm_vision_tower / mm_projector_type: not a LLaVA checkpoint"
    ):
        detect_format(broken)
    with pytest.raises(RequestError, match=r"^--model: .*not a LLaVA checkpoint"):
        load_llava_repo(broken, vision_tower=originals.clip)
    with pytest.raises(RequestError, match=r"^--model: .*not a LLaVA checkpoint"):
        load_llava_repo(originals.base, vision_tower=originals.clip)


def test_lora_adapter_without_non_lora_trainables(originals: Originals, tmp_path: Path) -> None:
    broken = _copy(originals.lora, tmp_path / "lora", drop=("non_lora_trainables.bin",))
    with pytest.raises(
        RequestError,
        match=r"^--adapter: .* looks like a LLaVA-repository LoRA adapter "
        r"but has no non_lora_trainables\.bin",
    ):
        detect_format(broken, flag="--adapter")


def test_lora_without_base_or_given_as_model(originals: Originals) -> None:
    with pytest.raises(
        RequestError, match=r"^--model: .*needs its base language model: pass --model BASE_DIR"
    ):
        load_llava_repo_lora(originals.lora, None, vision_tower=originals.clip)
    with pytest.raises(RequestError, match=r"^--model: .*pass it as --adapter and its base LM as --model"):
        load_llava_repo(originals.lora, vision_tower=originals.clip)


def test_base_whose_hidden_size_differs_from_the_adapter(originals: Originals, tmp_path: Path) -> None:
    small = write_mistral_base(tmp_path / "small-base", hidden=48)
    with pytest.raises(
        RequestError, match=r"^--model: .*base hidden size 48 does not match the adapter's 64"
    ):
        load_llava_repo_lora(originals.lora, small, vision_tower=originals.clip)


def test_missing_vision_tower_asks_for_the_flag(originals: Originals, tmp_path: Path) -> None:
    with pytest.raises(
        RequestError, match=r"^--vision-tower: .*openai/clip-vit-large-patch14-336.*--vision-tower DIR"
    ):
        load_llava_repo(originals.geochat)
    with pytest.raises(RequestError, match=r"^--vision-tower: .*--vision-tower DIR"):
        load_llava_repo_lora(originals.lora, originals.base)
    with pytest.raises(RequestError, match=r"^--vision-tower: no such folder"):
        load_llava_repo(originals.geochat, vision_tower=tmp_path / "nope")


def test_vision_tower_flag_wins_over_a_local_mm_vision_tower(originals: Originals, tmp_path: Path) -> None:
    other = write_clip(tmp_path / "other-clip", seed=5)
    _, _, from_config = load_llava_repo(originals.llava15)
    _, _, from_flag = load_llava_repo(originals.llava15, vision_tower=other)
    assert from_config["vision_tower"] == str(originals.clip.resolve())
    assert from_flag["vision_tower"] == str(other.resolve())


# ---------------------------------------------------------------------------------------- parity

CASES = {
    "llava15": ("llava", SYSTEM_HUMAN + " USER: <image>\nWhat is in the image? ASSISTANT:"),
    "geochat": (
        "geochat",
        SYSTEM_HUMAN + " USER: <image>\n[refer] Give me the location of <p> the white ship </p> ASSISTANT:",
    ),
    "rsllava-lora": ("rsllava", SYSTEM_RSLLAVA + " USER: <image>\nDescribe the image. ASSISTANT:"),
}


def _load(case: str, o: Originals, **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    if case == "rsllava-lora":
        return load_llava_repo_lora(o.lora, o.base, vision_tower=o.clip, **kwargs)
    if case == "geochat":
        return load_llava_repo(o.geochat, vision_tower=o.clip, **kwargs)
    return load_llava_repo(o.llava15, **kwargs)  # vision tower from config.json (a local folder)


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_an_independent_reference(case: str, originals: Originals) -> None:
    expected_format, prompt = CASES[case]
    model, processor, info = _load(case, originals)
    size = GEOCHAT_IMAGE_SIZE if case == "geochat" else CLIP_IMAGE_SIZE
    assert info["image_size"] == size
    assert info["prompt_format"] == expected_format
    assert info["n_image_tokens"] == (size // CLIP_PATCH) ** 2
    pixels = _pixels(size)
    ref = _reference(case, originals, prompt, pixels)
    vocab = info["original_vocab_size"]
    assert ref.logits.shape[1] == vocab

    ids = llava_chunked_ids(processor.tokenizer, prompt, info["image_token_id"], info["n_image_tokens"])
    assert ids == ref.ids_before + [info["image_token_id"]] * ref.n_image + ref.ids_after
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits[0]
    diff = float((logits[:, :vocab] - ref.logits).abs().max())
    print(f"{case}: max |logit diff| = {diff:.3e} over {tuple(ref.logits.shape)}")
    assert diff < ATOL

    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            max_new_tokens=N_NEW_TOKENS,
            do_sample=False,
            attention_mask=torch.ones_like(input_ids),
        )
    new = out[0, input_ids.shape[1] :].tolist()
    assert new == ref.greedy
    assert all(t < vocab for t in new)
    assert processor.tokenizer.decode(ref.text_ids, skip_special_tokens=True) == ref.text


def test_added_tokens_rows_are_the_mean_and_suppressed(originals: Originals) -> None:
    model, processor, info = _load("geochat", originals)
    vocab = info["original_vocab_size"]
    assert info["suppress_token_ids"] == [vocab, vocab + 1]
    assert list(model.generation_config.suppress_tokens) == [vocab, vocab + 1]
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [vocab, vocab + 1]
    assert processor.tokenizer.padding_side == "left"
    state = _ref_state(originals.geochat)
    for hf, original in (
        (model.get_input_embeddings().weight, "model.embed_tokens.weight"),
        (model.get_output_embeddings().weight, "lm_head.weight"),
    ):
        mean = state[original].float().mean(dim=0)
        assert torch.allclose(hf[vocab], mean, atol=1e-6) and torch.allclose(hf[vocab + 1], mean, atol=1e-6)
        assert torch.equal(hf[:vocab], state[original].float())


def test_processor_expands_the_image_token_to_the_tower_grid(originals: Originals) -> None:
    import numpy as np

    _, processor, info = _load("geochat", originals)
    image = np.full((30, 30, 3), 128, dtype=np.uint8)
    batch = processor(images=image, text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, GEOCHAT_IMAGE_SIZE, GEOCHAT_IMAGE_SIZE)
    assert int((batch["input_ids"] == info["image_token_id"]).sum()) == info["n_image_tokens"] == 81


# ---------------------------------------------------------------------------------------- GeoChat table


def test_geochat_position_interpolation_is_bicubic_align_corners(originals: Originals) -> None:
    state = torch.load(originals.clip / "pytorch_model.bin", weights_only=True)
    table = state["vision_model.embeddings.position_embedding.weight"]
    old, new = CLIP_IMAGE_SIZE // CLIP_PATCH, GEOCHAT_IMAGE_SIZE // CLIP_PATCH
    ours = interpolate_clip_positions(table, new)

    def reference(align_corners: bool) -> torch.Tensor:
        grid = table[1:].float().T.reshape(1, -1, old, old)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=align_corners)
        return torch.cat([table[:1].float(), grid.flatten(2)[0].T])

    assert ours.shape == (new * new + 1, table.shape[1]) and ours.dtype == torch.float32
    assert torch.equal(ours[0], table[0].float())  # CLS row kept
    assert torch.allclose(ours, reference(True), atol=1e-6)
    # Corners coincide with the original grid's corners only with align_corners=True.
    assert torch.allclose(ours[1], table[1].float(), atol=1e-6)
    assert torch.allclose(ours[new * new], table[old * old].float(), atol=1e-6)
    assert float((ours - reference(False)).abs().max()) > 1e-2

    model, _, _ = _load("geochat", originals)
    loaded = model.model.vision_tower.embeddings.position_embedding.weight
    assert torch.allclose(loaded, reference(True), atol=1e-6)
    assert model.config.vision_config.image_size == GEOCHAT_IMAGE_SIZE


# ---------------------------------------------------------------------------------------- tokenisation


class _CharTokenizer:
    """One id per character (its code point), BOS 1 before every call: easy to write ids by hand."""

    bos_token_id = 1

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1, *(ord(c) for c in text)]}


def test_llava_chunked_ids_by_hand() -> None:
    tok = _CharTokenizer()
    # "ab<image>\nc": [BOS] a b | 3 x image | "\n" c  (the second chunk's BOS dropped).
    assert llava_chunked_ids(tok, "ab<image>\nc", 9, 3) == [1, 97, 98, 9, 9, 9, 10, 99]
    # Image first: the empty first chunk keeps only its BOS.
    assert llava_chunked_ids(tok, "<image>x", 9, 2) == [1, 9, 9, 120]
    # Two images, no image.
    assert llava_chunked_ids(tok, "a<image>b<image>", 5, 1) == [1, 97, 5, 98, 5]
    assert llava_chunked_ids(tok, "ab", 9, 4) == [1, 97, 98]
    with pytest.raises(ValueError):
        llava_chunked_ids(tok, "a<image>", 9, 0)


def test_llava_chunked_ids_match_sentencepiece_chunks(originals: Originals) -> None:
    """The dummy-prefix '▁' at the start of every chunk, as LLaVA's slow tokenizer gives it."""
    import sentencepiece as spm

    _, processor, info = _load("llava15", originals)
    sp = spm.SentencePieceProcessor(model_file=str(originals.llava15 / "tokenizer.model"))
    prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
    ids = llava_chunked_ids(processor.tokenizer, prompt, info["image_token_id"], 2)
    assert ids == [
        1,
        *sp.encode("USER: "),
        info["image_token_id"],
        info["image_token_id"],
        *sp.encode("\nWhat is in the image? ASSISTANT:"),
    ]
    after = ids[ids.index(info["image_token_id"]) + 2 :]
    assert sp.id_to_piece(after[0]) == "▁" and sp.id_to_piece(after[1]) == "<0x0A>"


# ---------------------------------------------------------------------------------------- convert


def _logits(model: Any, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]


def test_convert_then_load_equals_direct_load_geochat(originals: Originals, tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dst = tmp_path / "geochat-hf"
    info = convert(originals.geochat, dst, vision_tower=originals.clip, dtype=torch.float32)
    assert detect_format(dst) == "hf-llava"
    # the published llava-hf tensor names (what vLLM 0.29 loads), not transformers 5's vision_tower.embeddings
    from safetensors import safe_open

    from rsflow.models.vllm_engine import check_vllm_spec

    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        tower = [k for k in f.keys() if k.startswith("vision_tower.")]  # noqa: SIM118 - a safe_open handle is not iterable
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    check_vllm_spec(ModelSpec(model=str(dst)))
    card = json.loads((dst / "rsflow.json").read_text())
    assert card["prompt_format"] == "geochat" and card["image_size"] == GEOCHAT_IMAGE_SIZE
    assert card["source_format"] == "llava-repo" and card["suppress_token_ids"] == info["suppress_token_ids"]
    spec = ModelSpec(model=str(dst))  # what the runner reads from the converted folder
    assert model_input_size(spec) == GEOCHAT_IMAGE_SIZE and resolve_prompt_format(spec) == "geochat"

    direct, processor, _ = load_llava_repo(originals.geochat, vision_tower=originals.clip)
    loaded = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    reloaded = AutoProcessor.from_pretrained(dst, backend="pil")
    assert list(loaded.generation_config.suppress_tokens) == info["suppress_token_ids"]
    prompt = CASES["geochat"][1]
    ids = llava_chunked_ids(processor.tokenizer, prompt, info["image_token_id"], info["n_image_tokens"])
    assert (
        llava_chunked_ids(reloaded.tokenizer, prompt, info["image_token_id"], info["n_image_tokens"]) == ids
    )
    pixels = _pixels(GEOCHAT_IMAGE_SIZE)
    assert torch.allclose(_logits(loaded, ids, pixels), _logits(direct, ids, pixels), atol=1e-5)


def test_convert_unmerged_lora_loads_with_peft(originals: Originals, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    dst = tmp_path / "rsllava-hf"
    info = convert(
        originals.base, dst, adapter=originals.lora, vision_tower=originals.clip, dtype=torch.float32
    )
    adapter_dir = Path(info["adapter_dir"])
    assert adapter_dir == dst / "adapter" and detect_format(adapter_dir, flag="--adapter") == "peft"
    assert json.loads((dst / "rsflow.json").read_text())["prompt_format"] == "rsllava"

    merged, processor, _ = load_llava_repo_lora(originals.lora, originals.base, vision_tower=originals.clip)
    base = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        via_peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = llava_chunked_ids(
        processor.tokenizer, CASES["rsllava-lora"][1], info["image_token_id"], info["n_image_tokens"]
    )
    pixels = _pixels(CLIP_IMAGE_SIZE)
    expected = _logits(merged, ids, pixels)
    assert torch.allclose(_logits(via_peft, ids, pixels), expected, atol=1e-4)
    assert torch.allclose(_logits(via_peft.merge_and_unload(), ids, pixels), expected, atol=1e-4)

    # The in-memory unmerged form equals the merged one too.
    unmerged, _, _ = load_original(originals.base, originals.lora, vision_tower=originals.clip, merge=False)
    assert torch.allclose(_logits(unmerged, ids, pixels), expected, atol=1e-4)


def test_convert_puts_a_stage1_projector_in_place(originals: Originals, tmp_path: Path) -> None:
    """GeoChat's stage 2 starts from LLaVA-v1.5-7B with LLaVA's stage-1 projector loaded into it
    (``--pretrain_mm_mlp_adapter``, models.md 3.7): ``convert --projector`` builds that base. Every other
    tensor is the checkpoint's; the card names the file."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    own = torch.load(originals.llava15 / "pytorch_model.bin", weights_only=True)
    generator = torch.Generator().manual_seed(7)
    stage1 = {k: torch.randn(v.shape, generator=generator) for k, v in own.items() if ".mm_projector." in k}
    assert sorted(stage1) == sorted(f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
    torch.save(stage1, tmp_path / "mm_projector.bin")

    dst = convert(originals.llava15, tmp_path / "with-stage1", projector=tmp_path / "mm_projector.bin",
                  dtype=torch.float32)["dst"]
    plain = convert(originals.llava15, tmp_path / "plain", dtype=torch.float32)["dst"]
    swapped = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).state_dict()
    original = LlavaForConditionalGeneration.from_pretrained(plain, dtype=torch.float32).state_dict()
    assert swapped.keys() == original.keys()
    for key, tensor in swapped.items():
        if "multi_modal_projector" in key:
            layer = {"linear_1": 0, "linear_2": 2}[key.split("multi_modal_projector.")[1].split(".")[0]]
            expected = stage1[f"model.mm_projector.{layer}.{key.rsplit('.', 1)[1]}"]
            assert torch.equal(tensor, expected), key
            assert not torch.equal(tensor, original[key]), key
        else:
            assert torch.equal(tensor, original[key]), key
    assert json.loads((Path(dst) / "rsflow.json").read_text())["projector"] == str((tmp_path / "mm_projector.bin").resolve())

    # rsflow's own stage-1 export (transformers names in projector.safetensors) is read the same way
    hf_names = {"model.multi_modal_projector.linear_1.weight": "model.mm_projector.0.weight",
                "model.multi_modal_projector.linear_1.bias": "model.mm_projector.0.bias",
                "model.multi_modal_projector.linear_2.weight": "model.mm_projector.2.weight",
                "model.multi_modal_projector.linear_2.bias": "model.mm_projector.2.bias"}
    save_file({hf: stage1[llava].contiguous() for hf, llava in hf_names.items()}, str(tmp_path / "projector.safetensors"))
    again = convert(originals.llava15, tmp_path / "from-safetensors", projector=tmp_path / "projector.safetensors",
                    dtype=torch.float32)["dst"]
    reloaded = LlavaForConditionalGeneration.from_pretrained(again, dtype=torch.float32).state_dict()
    assert all(torch.equal(reloaded[k], swapped[k]) for k in swapped if "multi_modal_projector" in k)


def test_convert_refuses_a_projector_it_cannot_use(originals: Originals, tmp_path: Path) -> None:
    own = torch.load(originals.llava15 / "pytorch_model.bin", weights_only=True)
    stage1 = {k: v.clone() for k, v in own.items() if ".mm_projector." in k}
    with pytest.raises(RequestError, match=r"^--projector: no such file"):
        convert(originals.llava15, tmp_path / "a", projector=tmp_path / "missing.bin")
    torch.save({k: v for k, v in stage1.items() if not k.endswith("2.bias")}, tmp_path / "three.bin")
    with pytest.raises(RequestError, match=r"^--projector: .*expected the projector tensors"):
        convert(originals.llava15, tmp_path / "b", projector=tmp_path / "three.bin")
    torch.save({**stage1, "model.mm_projector.0.weight": torch.zeros(3, 5)}, tmp_path / "shape.bin")
    with pytest.raises(RequestError, match=r"^--projector: .*shape.bin: tensor for .*linear_1.weight has shape \(3, 5\)"):
        convert(originals.llava15, tmp_path / "c", projector=tmp_path / "shape.bin")
    (tmp_path / "text.bin").write_text("not a state dict")
    with pytest.raises(RequestError, match=r"^--projector: .*cannot read it"):
        convert(originals.llava15, tmp_path / "d", projector=tmp_path / "text.bin")
    torch.save(stage1, tmp_path / "ok.bin")
    with pytest.raises(RequestError, match=r"^--projector: .*brings its own"):
        convert(originals.base, tmp_path / "e", adapter=originals.lora, projector=tmp_path / "ok.bin")
    assert not any((tmp_path / n).exists() for n in "abcde"), "nothing written for refused input"


def test_a_tied_checkpoint_without_lm_head_loads_and_converts(originals: Originals, tmp_path: Path) -> None:
    """A checkpoint whose config ties the output layer to the embedding stores no lm_head.weight; the
    output layer is the embedding, as transformers' converter clones it (models.md 5.1). Loading failed
    with "model tensor(s) were not in the checkpoint"."""
    from transformers import LlavaForConditionalGeneration

    tied = tmp_path / "tied"
    shutil.copytree(originals.llava15, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    state = torch.load(tied / "pytorch_model.bin", weights_only=True)
    embedding = state["model.embed_tokens.weight"]
    del state["lm_head.weight"]
    torch.save(state, tied / "pytorch_model.bin")

    model, _, _ = load_original(tied, dtype=torch.float32)
    output = model.get_output_embeddings().weight
    assert output is model.get_input_embeddings().weight
    assert torch.equal(output[: embedding.shape[0]], embedding)  # plus the padded <image>/<pad> rows
    dst = convert(tied, tmp_path / "converted", dtype=torch.float32)["dst"]
    reloaded = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_convert_refuses_a_lora_folder_as_model_and_a_non_empty_dst(
    originals: Originals, tmp_path: Path
) -> None:
    with pytest.raises(RequestError, match=r"^--model: .*pass it as --adapter"):
        convert(originals.lora, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RequestError, match=r"^DST: .*not an empty folder"):
        convert(originals.geochat, tmp_path / "full", vision_tower=originals.clip)


def test_a_convert_that_stops_half_way_leaves_no_dst(originals: Originals, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The converted folder is written beside DST and renamed onto it at the end: a convert stopped after the
    weights were written (here the processor's save fails; a kill is the same) leaves no DST that looks
    like a model (it used to leave one with a 0-byte processor_config.json), and nothing hidden either.
    An empty DST folder is filled as before."""
    from rsflow.models import formats

    real = formats.save_llava_hf

    def then_fail(model, out):
        real(model, out)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(formats, "save_llava_hf", then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert(originals.geochat, tmp_path / "out", vision_tower=originals.clip)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(formats, "save_llava_hf", real)
    (tmp_path / "out").mkdir()
    info = convert(originals.geochat, tmp_path / "out", vision_tower=originals.clip)
    assert info["dst"] == str(tmp_path / "out") and (tmp_path / "out" / "rsflow.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lora_round_trip_through_peft_gives_the_same_tensors(originals: Originals, tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    info = convert(
        originals.base, dst, adapter=originals.lora, vision_tower=originals.clip
    )  # dtype: config's
    back = tmp_path / "exported"
    export_llava_repo_lora(info["adapter_dir"], dst, back)
    assert detect_format(back, flag="--adapter") == "llava-repo-lora"
    for name in ("adapter_model.bin", "non_lora_trainables.bin"):
        original = torch.load(originals.lora / name, weights_only=True)
        exported = torch.load(back / name, weights_only=True)
        assert sorted(exported) == sorted(original), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype, key
            assert torch.equal(exported[key], tensor), key
    adapter_config = json.loads((back / "adapter_config.json").read_text())
    original_config = json.loads((originals.lora / "adapter_config.json").read_text())
    assert adapter_config == original_config
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (originals.lora / "config.json").read_text()
    )
    # And the exported folder loads like the original.
    again, _, _ = load_llava_repo_lora(back, originals.base, vision_tower=originals.clip)
    first, processor, loaded = load_llava_repo_lora(
        originals.lora, originals.base, vision_tower=originals.clip
    )
    ids = llava_chunked_ids(
        processor.tokenizer,
        "USER: <image>\nhi ASSISTANT:",
        loaded["image_token_id"],
        loaded["n_image_tokens"],
    )
    pixels = _pixels(CLIP_IMAGE_SIZE)
    assert torch.equal(_logits(again, ids, pixels), _logits(first, ids, pixels))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_original_files_run_with_the_attention_kernel_asked_for(originals: Originals, attn: str) -> None:
    """``--attn-implementation`` reaches a model built from original files, on its vision tower and its
    language model, as it does a transformers-format one: what the runner reports is what runs."""
    from rsflow.models.runner import load_model

    loaded = load_model(ModelSpec(model=str(originals.llava15), attn_implementation=attn), device="cpu")
    model = loaded.model
    assert loaded.attn_implementation == attn
    assert model.config._attn_implementation == attn
    assert model.config.vision_config._attn_implementation == attn
    assert model.config.text_config._attn_implementation == attn


@pytest.mark.parametrize(("value", "want"), [("pad", "pad"), ("square", "crop"), ("crop", "crop"), (None, "crop")])
def test_only_pad_pads_an_original_checkpoints_tiles(originals: Originals, tmp_path: Path, value, want) -> None:
    """LLaVA's builder pads to a square only for ``image_aspect_ratio: "pad"``; any other value, or none,
    goes straight to the processor (resize and centre crop): rsflow reads the config the same way."""
    from rsflow.models.spec import model_card

    folder = tmp_path / "llava"
    shutil.copytree(originals.llava15, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("image_aspect_ratio", None)
    if value is not None:
        config["image_aspect_ratio"] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert model_card(ModelSpec(model=str(folder)))["image_aspect_ratio"] == want
