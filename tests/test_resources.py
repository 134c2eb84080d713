"""Disk and memory preflight: estimates bound what stages really write, and a stage refuses with
both figures when the store's filesystem or the machine lacks them."""
import json

import pytest

from pipeline import resources


def test_every_stage_estimated_at_least_what_it_wrote(chain):
    manifests = [json.loads(p.read_text()) for p in chain.artifacts.glob("*/*/manifest.json")]
    assert {m["stage"] for m in manifests} >= {"Corpus", "BaseModel", "ReluModel", "HiddenStates", "ExpertClusters",
                                               "Routers", "Moefied", "PruningMasks", "FinalCompressed", "Report"}
    for m in manifests:
        written = sum(f["bytes"] for f in m["files"].values())
        assert m["metrics"]["estimated_disk_bytes"] >= written, (m["stage"], m["metrics"]["estimated_disk_bytes"], written)
        assert m["metrics"]["estimated_memory_bytes"] > 0, m["stage"]


def test_refusal_names_both_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: type("U", (), {"free": 3 * resources.GB})())
    need = resources.Needs(disk=5 * resources.GB, memory=1, what="five shards")
    with pytest.raises(resources.NotEnoughResources) as e:
        resources.check("HiddenStates", need, tmp_path)
    assert str(e.value).startswith(f"HiddenStates needs about 5.00 GiB of disk in {tmp_path} (five shards), "
                                   f"and 3.00 GiB is free")
    resources.check("HiddenStates", resources.Needs(disk=2 * resources.GB, memory=1), tmp_path)
    monkeypatch.setenv(resources.MEMORY_LIMIT_ENV, "0.5")
    with pytest.raises(resources.NotEnoughResources, match=r"needs about 1.00 GiB of memory, and 512.00 MiB is available"):
        resources.check("Report", resources.Needs(disk=0, memory=resources.GB), tmp_path)
