"""ddpm.py --clusters: classes found by k-means of the images, without labels, trained on and guided with."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
import sample
from checkpoints import load_checkpoint
from config import cluster_count
from ddpm import Diffusion
from modules import UNet
from sampling import generate
from utils import UserError, cluster_images

TINY = ["--image-size", "8", "--base-width", "8", "--batch-size", "4", "--sample-steps", "3",
        "--n-samples", "4", "--seed", "0", "--noise-steps", "50"]


def dark_and_bright(folder, n=6):
    """A flat folder (no classes): n dark noisy images, then n bright ones."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(2 * n):
        low = 0 if i < n else 200
        Image.fromarray(rng.integers(low, low + 56, (8, 8, 3), dtype=np.uint8)).save(f"{folder}/{i:02d}.png")
    return folder


def run_main(argv, capsys):
    import train

    with pytest.raises(SystemExit) as e:
        train.main(False, argv)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def test_clusters_are_found_without_labels_and_repeat(tmp_path):
    folder = dark_and_bright(str(tmp_path / "flat"))
    labels = cluster_images(folder, 8, 3, 2, seed=0)
    assert labels[:6].unique().numel() == 1 and labels[6:].unique().numel() == 1 and labels[0] != labels[6]
    assert torch.equal(labels, cluster_images(folder, 8, 3, 2, seed=0))
    # centres fitted on 8 of the 12 images (both groups among them): every image still goes to its own group
    subset = cluster_images(folder, 8, 3, 2, seed=0, fit_images=8)
    assert torch.equal(subset == subset[0], labels == labels[0])
    with pytest.raises(UserError, match="--clusters 13: more clusters than the 12 images"):
        cluster_images(folder, 8, 3, 13)
    assert [cluster_count(100, n) for n in (12, 500, 1797, 5000)] == [2, 50, 100, 100]  # one per 10 images at most
    assert cluster_count(40, 5000) == 40


def test_a_clusters_run_trains_on_clusters_of_its_images_and_resumes_only_on_the_same(tmp_path, in_tmp, monkeypatch,
                                                                                       capsys):
    import train

    folder = dark_and_bright(str(tmp_path / "flat"))
    seen = []
    drop_labels = train.drop_labels

    def spy(labels, u, c):
        seen.append(labels.clone())
        return drop_labels(labels, u, c)

    monkeypatch.setattr(train, "drop_labels", spy)
    args = ["--dataset-path", folder, "--run-name", "k", *TINY]
    train.main(False, [*args, "--clusters", "100", "--epochs", "1"])  # at most one per 10 images: 2
    assert "12 images from " + folder + " in 2 k-means clusters" in capsys.readouterr().out
    # a flat folder labels every image 0: the network saw the two clusters instead
    assert torch.cat(seen).unique().tolist() == [0, 1]
    config = json.load(open("models/k/config.json"))
    assert config["network"]["clusters"] == 2 and config["network"]["num_classes"] == 2
    assert config["data"]["cluster_sizes"] == [6, 6]
    assert config["sample_grids"]["cfg_scale"] == 2.5 and config["training"]["guide_at"] == 0.0  # CFG guides it
    for name in ("ckpt.pt", "ema_ckpt.pt"):  # UNet's layout, as every ddpm.py run; the clusters beside it
        UNet(c_in=3, c_out=3, base_width=8).load_state_dict(load_checkpoint(f"models/k/{name}"))
        assert load_checkpoint("models/k/clusters.pt")[name]["label_emb.weight"].shape == (2, 256)
    assert not os.path.exists("models/k/guide_ckpt.pt")
    sample.main(["--ckpt", "models/k", "--n", "4", "--steps", "3", "--out", "grid.png", "--no-progress"])
    assert "CFG 2.5 where sigma > 1" in capsys.readouterr().out and os.path.isfile("grid.png")  # guided by them
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", "models/k", "--labels", "1", "--out", "one.png"])
    assert "takes no labels" in capsys.readouterr().err and not os.path.exists("one.png")

    dark_and_bright(folder, n=8)  # four more images: other clusters than the run's
    before = load_checkpoint("models/k/ckpt.pt")
    code, err = run_main([*args, "--epochs", "2", "--resume"], capsys)
    assert code == 2 and "no longer fall into the clusters this run started with" in err
    assert all(torch.equal(before[k], v) for k, v in load_checkpoint("models/k/ckpt.pt").items())


def test_clusters_checkpoints_are_unets_and_load_back_whole(tmp_path):
    from checkpoints import load_model, load_run, save_run
    from config import RunConfig

    c = RunConfig(clusters=2, num_classes=2, channels=1, base_width=8, cluster_sizes=[1, 1])
    model, ema = c.make_model(), c.make_model()  # two random inits: two different embeddings
    save_run(str(tmp_path), model, ema, torch.optim.AdamW(model.parameters()), {"epoch": 0}, c)
    UNet(c_in=1, c_out=1, base_width=8).load_state_dict(load_checkpoint(str(tmp_path / "ckpt.pt")))
    again, again_ema = c.make_model(), c.make_model()
    load_run(str(tmp_path), again, again_ema, torch.optim.AdamW(again.parameters()))
    assert torch.equal(again.label_emb.weight, model.label_emb.weight)
    assert torch.equal(again_ema.label_emb.weight, ema.label_emb.weight)
    assert torch.equal(load_model(str(tmp_path / "ema_ckpt.pt"))[0].label_emb.weight, ema.label_emb.weight)
    os.remove(tmp_path / "clusters.pt")
    with pytest.raises(UserError, match="clusters.pt, its clusters' embedding, is not beside it"):
        load_model(str(tmp_path / "ema_ckpt.pt"))


def test_samples_draw_clusters_as_the_images_fall_into_them():
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            seen.append(y)
            return x * self.w

    net = Net()
    diffusion = Diffusion(noise_steps=20, img_size=8, device="cpu")
    images, labels = generate(net, diffusion, 6, sampler="ddim", steps=2, cfg_scale=2.0, seed=0, progress=False,
                              clusters=[0, 5, 0])
    assert images.shape[0] == 6 and labels is None  # unconditional samples: no labels to report
    assert {int(v) for y in seen for v in y} <= {1, -1} and any((y == 1).any() for y in seen)


def test_clusters_and_cfg_options_fail_clearly(image_folder, in_tmp, capsys):
    base = ["--dataset-path", image_folder, "--epochs", "1", *TINY]
    code, err = run_main([*base, "--clusters", "0", "--cfg-scale", "3"], capsys)
    assert code == 2 and "--cfg-scale / --cfg-min-sigma guide by labels" in err and "--clusters" in err
    code, err = run_main([*base, "--clusters", "1"], capsys)
    assert code == 2 and "--clusters must be 0 (off) or at least 2, got 1" in err
    assert not os.path.exists("models")
    os.makedirs("one")
    Image.new("RGB", (8, 8)).save("one/a.png")
    code, err = run_main(["--dataset-path", "one", "--clusters", "2", "--epochs", "1", *TINY], capsys)
    assert code == 2 and "one image cannot be sorted into clusters" in err and "drop --clusters" in err
    assert not os.path.exists("models")


def test_two_processes_train_on_rank_0s_clusters(tmp_path):
    dark_and_bright(str(tmp_path / "flat"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "ddpm.py"), "--dataset-path", "flat", "--clusters", "2", "--epochs", "1",
                        "--run-name", "ddp", "--no-amp", *TINY], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.load(open(tmp_path / "models" / "ddp" / "config.json"))["data"]["cluster_sizes"] == [6, 6]


def test_bench_quality_scores_guidance_scales_only_where_there_are_labels(capsys):
    import bench_quality

    with pytest.raises(SystemExit) as e:
        bench_quality.main(["--unconditional", "--recipes", "clusters-40,default", "--cfg-scales", "2,3"])
    assert e.value.code == 2 and "only the clusters-K recipes have them" in capsys.readouterr().err
    # the unconditional default is the plain model; clusters-K bring what `ddpm.py --clusters K` brings
    default, no_guide, k = (bench_quality.recipe_config(r, 0, False, None)
                            for r in ("default", "no-guide", "clusters-40"))
    assert (default.clusters, default.guide_at, default.sample_steps, default.corrector_snr) == (0, 0.25, 100, 0.3)
    assert (no_guide.clusters, no_guide.guide_at) == (0, 0.0)
    assert (k.clusters, k.cfg_scale, k.guide_at, k.sample_steps, k.corrector_snr) == (40, 2.5, 0.0, 50, 0.0)


def test_bench_quality_reuses_a_clusters_run_whatever_its_cluster_sizes():
    import bench_quality

    config = bench_quality.recipe_config("clusters-40", 0, False, "data/mnist")
    saved = dataclasses.replace(config, cluster_sizes=[125] * 40, data_seed=0, epochs=3)  # as training left it
    assert bench_quality.recipe_changes(saved, config) == []
    assert bench_quality.recipe_changes(dataclasses.replace(saved, clusters=10), config) == ["clusters 10, not 40"]
