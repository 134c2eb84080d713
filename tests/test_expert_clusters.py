"""ExpertClusters through Luigi on the smoke preset."""
import json

import numpy as np
from safetensors.torch import load_file


def test_expert_clusters_stage(project):
    project.luigi("ExpertClusters")
    [path] = project.artifacts.glob("ExpertClusters/*/manifest.json")
    m = json.loads(path.read_text())["metrics"]
    assert m["layers"] == 2 and m["num_expert"] == 8 and m["expert_size"] == 32
    assert all(c > r for c, r in zip(m["cosine_to_centroid"], m["random_split_cosine"])), m
    clusters = load_file(str(path.parent / "clusters.safetensors"))
    for layer in range(2):
        labels = clusters[f"layer_{layer:03d}.labels"].numpy()
        assert (np.bincount(labels, minlength=8) == 32).all()
        assert clusters[f"layer_{layer:03d}.centroids"].shape == (8, 64)
    bad = project.luigi("ExpertClusters", "--ExpertClusters-num-expert", "7", check=False)
    assert bad.returncode != 0
    assert "num_expert 7 does not divide the 256 neurons into equal experts" in bad.stdout + bad.stderr
