"""kohya LoRA outputs keep the base-model metadata their inputs agree on and get their own hashes
(spec adapters.md, "Outputs keep the metadata users rely on")."""
from __future__ import annotations

import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_ortho.lora_out import kohya_hashes
from mergekit_ortho.testing.checkpoints import random_base, write_safetensors
from mergekit_ortho.testing.loras import SD15_BASE, SD15_KOHYA, kohya_tensors

SHARED = {"ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5-pruned.safetensors",
          "ss_new_sd_model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
          "ss_clip_skip": "2", "modelspec.architecture": "stable-diffusion-v1/lora",
          "modelspec.sai_model_spec": "1.0.0", "modelspec.resolution": "512x512"}


def test_agreed_metadata_is_kept_training_records_are_not_and_hashes_are_the_outputs(tmp_path, cli):
    write_safetensors(tmp_path / "base.safetensors", random_base(SD15_BASE))
    one = write_safetensors(tmp_path / "one.safetensors", kohya_tensors(SD15_KOHYA, SD15_BASE, rank=4, seed=1),
                            metadata={**SHARED, "ss_resolution": "(512, 512)", "ss_num_train_images": "40",
                                      "modelspec.title": "one", "sshs_model_hash": "0" * 64})
    two = write_safetensors(tmp_path / "two.safetensors", kohya_tensors(SD15_KOHYA, SD15_BASE, rank=2, seed=2),
                            metadata={**SHARED, "ss_resolution": "(768, 768)", "ss_clip_skip": "2",
                                      "modelspec.title": "two"})
    doc = {"merge_method": "task_arithmetic", "output": {"format": "kohya"},
           "models": [{"model": str(one), "parameters": {"weight": 0.5}}, {"model": str(two)}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "m.safetensors")
    assert code == 0, out + err
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    for k, v in SHARED.items():
        assert meta.get(k) == v, k
    for k in ("ss_resolution", "ss_num_train_images", "modelspec.title"):  # disagree / training records / identity
        assert k not in meta, k
    assert meta["ss_network_dim"] == "6"  # rank 4 + rank 2, concatenated exactly
    want = kohya_hashes(load_file(str(tmp_path / "m.safetensors")), meta)
    assert meta["sshs_model_hash"] == want["sshs_model_hash"] != "0" * 64
    assert meta["sshs_legacy_hash"] == want["sshs_legacy_hash"]
