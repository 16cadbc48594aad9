"""Original-format checkpoints through the region job and `rsflow convert`, as users point at them.

GeoChat-style full model (--model DIR --vision-tower CLIP) and RS-LLaVA-style LoRA on a Mistral base
(--model BASE --adapter LORA): each family's template is chosen from the checkpoint, the family's
task limits apply, and a converted folder answers exactly as the original files do.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pytest

from rsflow.cli import main

pytest.importorskip("sentencepiece")
from tests.original_formats import write_clip, write_llava_repo, write_llava_repo_lora, write_mistral_base  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BBOX = "-75.70,37.650,-75.695,37.652"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    clip = write_clip(root / "clip")
    geochat = write_llava_repo(root / "geochat-7B", vision_tower=str(clip), geochat=True)
    base = write_mistral_base(root / "neural-chat")
    lora = write_llava_repo_lora(root / "RS-llava-v1.5-7b-LoRA", base_dir=base, vision_tower=str(clip))
    return {"clip": clip, "geochat": geochat, "base": base, "lora": lora}


def _run(args):
    return main(["--log-level", "WARNING", "region", *args])


def test_geochat_and_rsllava_run_with_their_own_templates(ray_local, sample_catalog, originals, tmp_path, capsys):
    common = ["--stac", str(sample_catalog), "--bbox", BBOX, "--max-new-tokens", "6"]
    geo = tmp_path / "geochat"
    assert _run([*common, "--model", str(originals["geochat"]), "--vision-tower", str(originals["clip"]),
                 "--tasks", "caption,detect", "--detect", "ship", "--output", str(geo)]) == 0
    m = json.loads((geo / "_manifest.json").read_text())
    assert m["prompt_format"] == "geochat"
    assert m["tile_spec"]["size_px"] == 72  # GeoChat's 3/2 of the CLIP input (504 for the real 336)
    assert (gpd.read_parquet(geo).query("kind == 'tile'")["status"] == "ok").all()

    rs = tmp_path / "rsllava"
    assert _run([*common, "--model", str(originals["base"]), "--adapter", str(originals["lora"]),
                 "--output", str(rs)]) == 0
    m = json.loads((rs / "_manifest.json").read_text())
    assert m["prompt_format"] == "rsllava"
    assert m["prompts"][0]["prompt"] == "Provide a description of the image."
    assert m["tile_spec"]["size_px"] == 48
    # RS-LLaVA cannot locate objects: refused before any work, naming the task and the family
    capsys.readouterr()
    assert _run([*common, "--model", str(originals["base"]), "--adapter", str(originals["lora"]),
                 "--tasks", "detect", "--detect", "ship", "--output", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--tasks" in err and "'rsllava'" in err and not (tmp_path / "no").exists()


def test_converted_folder_answers_like_the_original_files(ray_local, sample_catalog, originals, tmp_path):
    merged = tmp_path / "rs-merged"
    assert main(["convert", str(originals["base"]), str(merged), "--adapter", str(originals["lora"]),
                 "--merge-lora", "--vision-tower", str(originals["clip"])]) == 0
    assert (merged / "model.safetensors").is_file() or list(merged.glob("model-*.safetensors"))
    unmerged = tmp_path / "rs-peft"
    assert main(["convert", str(originals["base"]), str(unmerged), "--adapter", str(originals["lora"]),
                 "--vision-tower", str(originals["clip"])]) == 0
    assert (unmerged / "adapter" / "adapter_config.json").is_file()

    common = ["--stac", str(sample_catalog), "--bbox", BBOX, "--max-new-tokens", "8"]
    runs = {
        "direct": ["--model", str(originals["base"]), "--adapter", str(originals["lora"])],
        "merged": ["--model", str(merged)],
        "peft": ["--model", str(unmerged), "--adapter", str(unmerged / "adapter")],
    }
    texts = {}
    for name, model_args in runs.items():
        out = tmp_path / f"out-{name}"
        assert _run([*common, *model_args, "--output", str(out)]) == 0
        gdf = gpd.read_parquet(out).sort_values("tile_id")
        assert json.loads((out / "_manifest.json").read_text())["prompt_format"] == "rsllava"
        texts[name] = list(gdf["text"])
    assert texts["direct"] == texts["merged"] == texts["peft"]
    assert all(isinstance(t, str) for t in texts["direct"])


def test_incomplete_checkpoints_fail_with_one_line(ray_local, sample_catalog, originals, tmp_path, capsys):
    common = ["--stac", str(sample_catalog), "--bbox", BBOX]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(originals["geochat"]).iterdir():
        if f.name != "pytorch_model-00002-of-00002.bin":
            (broken / f.name).write_bytes(f.read_bytes())
    cases = [
        (["--model", str(broken), "--vision-tower", str(originals["clip"])], "pytorch_model-00002-of-00002.bin"),
        (["--model", str(originals["geochat"])], None),  # mm_vision_tower is a local path here: loads
        (["--model", str(originals["lora"])], "--adapter"),  # a LoRA folder given as the model
    ]
    for args, expected in cases[::2]:
        capsys.readouterr()
        code = _run([*common, *args, "--output", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
