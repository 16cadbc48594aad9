"""The demo model: the packaged one (``--model demo``, the region job's default) scored on held-out
blocks, and the recipe that makes it (``training/train_demo.py``) run end to end on Ray Train.

The packaged model's score is measured here, through the region job's inference code, on a freshly
built demo set (the chips are the pixels the region job reads). The recipe test trains a short
version (few steps: the full one takes minutes and is what made the packaged model) and checks
what it produces: the adapter changes the region job's answers through ``--adapter``, and the
LLaVA-repository export, loaded by the published-checkpoint loader onto the base language model and
the CLIP tower, gives the same logits as transformers' LLaVA + the peft adapter.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pyproj import Transformer

from rsflow.cli import main
from rsflow.finetune.demo import demo_model_dir, evaluate_demo, score_table, scores_from_card
from rsflow.finetune.demo_data import QUESTIONS, DemoDataset, build_demo_dataset

_REPO = Path(__file__).resolve().parents[1]
_WATER_Q = QUESTIONS["has_water"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return build_demo_dataset(tmp_path_factory.mktemp("demo-data"))


def _shore_bbox(demo: DemoDataset) -> str:
    """lon/lat box between the centres of tiles r04c10 and r11c21: land, shore and water."""
    rows = {r["id"]: r for r in pq.read_table(demo.labels_parquet).to_pylist()}
    to_lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    corners = []
    for tile in ("r04c10", "r11c21"):
        r = rows[tile]
        corners.append(to_lonlat.transform((r["left"] + r["right"]) / 2, (r["bottom"] + r["top"]) / 2))
    (x0, y0), (x1, y1) = corners
    return f"{min(x0, x1):.6f},{min(y0, y1):.6f},{max(x0, x1):.6f},{max(y0, y1):.6f}"


def _water_answers(out: Path) -> dict[str, str]:
    """Demo tile id (``rRRcCC`` from the read window) -> the region job's answer to the water question
    (the ``answer`` column: normalised as the VQA scorers do, lower case)."""
    gdf = gpd.read_parquet(out)
    gdf = gdf[(gdf["kind"] == "tile") & (gdf["task"] == "vqa")]
    assert (gdf["prompt_key"] == _WATER_Q).all()
    assert (gdf["status"] == "ok").all()
    return {
        f"r{int(r.window_row_off) // 64:02d}c{int(r.window_col_off) // 64:02d}": str(r.answer)
        for r in gdf.itertuples()
    }


# ------------------------------------------------------------------------------- the packaged model


def test_packaged_demo_model_beats_the_baselines_on_held_out_blocks(demo: DemoDataset) -> None:
    scores = evaluate_demo("demo", demo.root)
    print("\npackaged demo model, held-out blocks:\n" + score_table(scores))
    water, more = scores["has_water"], scores["more_cover"]
    assert water.n == demo.n_test_tiles
    assert water.accuracy >= 0.9, score_table(scores)
    assert water.accuracy >= water.baseline + 0.2
    assert more.accuracy >= more.baseline + 0.2  # "clearly beats its majority-class baseline"
    for key, score in scores.items():  # the baselines are the dataset's own
        assert score.baseline == pytest.approx(demo.test_baselines[key])
        assert score.majority_answer == demo.test_majority_answers[key]
    # what the model's card claims is what it does
    recorded = scores_from_card(demo_model_dir())
    assert {k: (v["correct"], v["n"]) for k, v in recorded.items()} == {
        k: (s.correct, s.n) for k, s in scores.items()
    }
    card = json.loads((demo_model_dir() / "rsflow.json").read_text())
    assert card["kind"] == "demo" and "not for real use" in card["note"]
    assert sum(f.stat().st_size for f in demo_model_dir().iterdir()) < 5 * 2**20


@pytest.mark.ray
def test_region_job_default_model_is_the_demo_and_answers_from_the_imagery(
    ray_local: Any, sample_catalog: Path, demo: DemoDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shore"
    code = main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog), "--bbox", _shore_bbox(demo),
                 "--tasks", "caption,vqa", "--question", _WATER_Q, "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "is a demo model: a tiny LLaVA finetuned" in printed
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["demo"] is True and manifest["model"]["card"]["name"] == "rsflow-demo-s2"

    answers = _water_answers(out)
    truth = {r["id"]: r["has_water"] for r in pq.read_table(demo.labels_parquet).to_pylist()}
    agree = [answers[t] == truth[t].lower() for t in answers]
    print(f"\nregion job, {len(answers)} tiles across the shore: water answer agrees with NDWI on "
          f"{np.mean(agree):.3f}; truth Yes share {np.mean([truth[t] == 'Yes' for t in answers]):.3f}")
    assert len(answers) >= 60
    yes_share = np.mean([truth[t] == "Yes" for t in answers])
    assert 0.3 < yes_share < 0.7  # a box across the shoreline: both answers common
    # Tiles along the shore are the hard ones (0.78 here against 0.91 over all held-out blocks); the
    # answers follow the imagery well above always giving the box's majority answer.
    assert np.mean(agree) >= max(yes_share, 1 - yes_share) + 0.1
    gdf = gpd.read_parquet(out)
    captions = gdf[gdf["task"] == "caption"]["text"]
    assert captions.str.contains("water").any() and captions.str.contains("vegetation").any()


# -------------------------------------------------------------------------------- the recipe, short


def _train_demo_module() -> Any:
    spec = importlib.util.spec_from_file_location("train_demo", _REPO / "training" / "train_demo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_recipe(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("demo-work")
    summary = _train_demo_module().train_demo(
        work, work / "packaged", align_steps=4, instruct_steps=40, workers=2, min_water_accuracy=0.0
    )
    return {**summary, "work": work}


@pytest.mark.slow
@pytest.mark.ray
def test_short_recipe_runs_both_stages_and_packages(short_recipe: dict[str, Any]) -> None:
    work = short_recipe["work"]
    for stage, steps in (("align", 4), ("instruct", 40)):
        rows = (work / "runs" / f"demo-{stage}" / "loss.csv").read_text().strip().splitlines()
        assert len(rows) == steps + 1
    packaged = Path(short_recipe["packaged"])
    card = json.loads((packaged / "rsflow.json").read_text())
    assert card["kind"] == "demo" and card["provenance"]["stages"]["instruct"]["steps"] == 40
    assert set(card["heldout"]) == set(QUESTIONS)
    assert "Held-out blocks" in (packaged / "MODEL_CARD.md").read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_trained_adapter_changes_the_region_job_answers(
    short_recipe: dict[str, Any], sample_catalog: Path, demo: DemoDataset, tmp_path: Path
) -> None:
    common = ["--log-level", "WARNING", "region", "--stac", str(sample_catalog), "--bbox", _shore_bbox(demo),
              "--tasks", "vqa", "--question", _WATER_Q, "--model", short_recipe["aligned_model"]]
    assert main([*common, "--output", str(tmp_path / "base")]) == 0
    assert main([*common, "--adapter", short_recipe["adapter"], "--output", str(tmp_path / "tuned")]) == 0
    base, tuned = _water_answers(tmp_path / "base"), _water_answers(tmp_path / "tuned")
    assert base.keys() == tuned.keys()
    changed = sum(base[t] != tuned[t] for t in base)
    assert changed >= len(base) // 10, (changed, len(base))  # the adapter (LoRA + projector) took effect
    manifest = json.loads((tmp_path / "tuned" / "_manifest.json").read_text())
    assert "+adapter=" in manifest["model"]["id"]


def _split_llava(model_dir: Path, out: Path) -> tuple[Path, Path]:
    """A transformers LLaVA -> its language model (a LlamaForCausalLM folder with the tokenizer) and its
    vision tower (a CLIPVisionModel folder): the two inputs the LLaVA repository's LoRA loader takes."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    lm = LlamaForCausalLM(llava.config.text_config)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    lm.save_pretrained(out / "lm")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out / "lm")
    tower = llava.model.vision_tower
    assert isinstance(tower, CLIPVisionModel)
    tower.save_pretrained(out / "clip")
    return out / "lm", out / "clip"


@pytest.mark.slow
@pytest.mark.ray
def test_llava_repo_export_loads_with_identical_logits(short_recipe: dict[str, Any], tmp_path: Path) -> None:
    from rsflow.models.formats import detect_format, llava_chunked_ids, load_llava_repo_lora
    from rsflow.models.runner import load_model
    from rsflow.models.spec import ModelSpec

    llava_repo = Path(short_recipe["adapter"]).parent / "llava_repo"
    assert detect_format(llava_repo, flag="--adapter") == "llava-repo-lora"
    lm_dir, clip_dir = _split_llava(Path(short_recipe["aligned_model"]), tmp_path)
    original, processor, info = load_llava_repo_lora(llava_repo, lm_dir, vision_tower=clip_dir)
    ours = load_model(ModelSpec(model=short_recipe["aligned_model"], adapter=short_recipe["adapter"]), "cpu")

    # the trained projector travelled: it is not the aligned base's
    from safetensors.torch import load_file

    trained = ours.model.model.multi_modal_projector.linear_1.weight
    non_lora = torch.load(llava_repo / "non_lora_trainables.bin", weights_only=True)
    assert torch.equal(non_lora["base_model.model.model.mm_projector.0.weight"], trained)
    aligned = load_file(str(Path(short_recipe["aligned_model"]) / "model.safetensors"))
    assert not torch.equal(aligned["multi_modal_projector.linear_1.weight"], trained)

    ids = torch.tensor([llava_chunked_ids(processor.tokenizer, "USER: <image>\n" + _WATER_Q + " ASSISTANT:",
                                          info["image_token_id"], info["n_image_tokens"])])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = original(input_ids=ids, pixel_values=pixels).logits
        b = ours.model(input_ids=ids, pixel_values=pixels).logits
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_the_recipe_refuses_an_output_it_would_replace_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packaging renames the model onto --output and deletes what was there: a folder of other files
    (``--output /shared/models``, meant as "put it in here") is refused before any training, and so is a
    --min-water-accuracy outside 0-1 (it trained for minutes, then refused to package)."""
    from rsflow.finetune.demo import check_demo_output

    module = _train_demo_module()
    monkeypatch.setattr(module, "train_demo", lambda *a, **k: pytest.fail("training started"))
    theirs = tmp_path / "models"
    (theirs / "results").mkdir(parents=True)
    (theirs / "results" / "data.parquet").write_text("theirs")
    assert module.main(["--output", str(theirs), "--work", str(tmp_path / "work")]) == 2
    assert "--output: " in capsys.readouterr().err and (theirs / "results" / "data.parquet").read_text() == "theirs"
    assert module.main(["--output", str(tmp_path / "new"), "--work", str(tmp_path / "w"),
                        "--min-water-accuracy", "2"]) == 2
    assert "--min-water-accuracy: must be between 0 and 1" in capsys.readouterr().err
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "rsflow.json").write_text('{"kind": "demo"}')
    check_demo_output(demo)  # an earlier demo model, an empty or a new folder: replaced as before
    check_demo_output(tmp_path / "empty-or-new")
