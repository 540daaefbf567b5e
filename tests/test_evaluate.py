"""The offline quality measures: Frechet distance, the cached in-domain classifier, the FID path."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from quality import Evaluator, fid, frechet_distance, inception_extractor
from utils import UserError


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, d)) @ (scale * g.standard_normal((d, d)) / np.sqrt(d)) + shift


def test_frechet_distance_of_a_sample_with_itself_is_zero_and_grows_with_a_shift():
    f = gaussian(400, 8, 0)
    assert abs(frechet_distance(f, f)) < 1e-6
    # same covariance: exactly the squared shift of the means
    fds = [frechet_distance(f, f + s) for s in (0.1, 0.5, 1.0)]
    assert np.allclose(fds, [8 * s**2 for s in (0.1, 0.5, 1.0)], rtol=1e-6)
    assert fds[0] < fds[1] < fds[2]


def test_frechet_distance_matches_the_formula_with_a_general_matrix_square_root():
    f1, f2 = gaussian(300, 6, 1), gaussian(300, 6, 2, shift=0.3, scale=1.5)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr sqrt(S1 S2) from the (real, positive) eigenvalues of the non-symmetric product
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(f1, f2) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(f1, f2) == pytest.approx(frechet_distance(f2, f1), rel=1e-6)


def test_fid_path_with_a_stand_in_feature_extractor():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 128, (40, 1, 8, 8), generator=g, dtype=torch.uint8)

    def extractor(x):  # stands in for Inception: any images -> (N, D) features
        return torch.nn.functional.avg_pool2d(x.float() / 255, 4).flatten(1)

    assert fid(a, a, extractor, batch=7) == pytest.approx(0, abs=1e-6)
    want = frechet_distance(extractor(a), extractor(b))
    assert fid(a, b, extractor, batch=7) == pytest.approx(want, rel=1e-9) and want > 0.01


def test_fid_without_weights_says_so(tmp_path, capsys):
    with pytest.raises(UserError, match="--inception-weights"):
        inception_extractor(None)
    with pytest.raises(UserError, match="no such file"):
        inception_extractor(str(tmp_path / "pt_inception.pth"))
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:  # a weights file but no package: the message says what to install
        weights = tmp_path / "w.pth"
        torch.save({}, weights)
        with pytest.raises(UserError, match="pip install pytorch-fid"):
            inception_extractor(str(weights))


def make_folder(root, n_per_class=30, size=12, seed=0):
    """Two easily told apart classes of grayscale images: dark with a bright top half, and the reverse."""
    rng = np.random.default_rng(seed)
    for c in (0, 1):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[: size // 2] += 180 if c == 0 else 0
            img[size // 2:] += 180 if c == 1 else 0
            Image.fromarray(img, mode="L").save(os.path.join(root, str(c), f"{i}.png"))
    return str(root)


def test_evaluator_trains_caches_and_scores(tmp_path):
    data = make_folder(tmp_path / "data")
    logs = []
    ev = Evaluator(data, image_size=8, channels=1, cache_dir=str(tmp_path / "models"), epochs=6, log=logs.append)
    cached = os.listdir(tmp_path / "models")
    assert len(cached) == 1 and cached[0].startswith("classifier_") and logs
    r = ev.evaluate(ev.real_a, ev.labels_a)
    assert r["label_acc"] > 0.9 and r["fd"] == pytest.approx(r["fd_floor"])
    assert r["class_acc"] == {0: ev.accuracy(ev.real_a[ev.labels_a == 0], ev.labels_a[ev.labels_a == 0]),
                              1: ev.accuracy(ev.real_a[ev.labels_a == 1], ev.labels_a[ev.labels_a == 1])}
    assert set(ev.heldout_class_acc) == {0, 1} and min(ev.heldout_class_acc.values()) > 0.8
    assert r["classifier_confident"] == ev.heldout_confident and 0 <= r["confident"] <= 1
    from quality import confident_share

    assert confident_share(torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 3.0]])) == pytest.approx(2 / 3)
    # wrong labels, one class only and pure noise all score worse
    bad = ev.evaluate(ev.real_a, 1 - ev.labels_a)
    assert bad["label_acc"] < 0.1
    ones = ev.real_a[ev.labels_a == 1]
    hist = ev.evaluate(ones)["histogram"]
    assert "label_acc" not in ev.evaluate(ones) and hist[1] > hist[0]
    noise = torch.randint(0, 256, ev.real_a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert ev.evaluate(noise)["fd"] > 2 * r["fd_floor"]
    # second use: loaded from the cache, no training
    logs.clear()
    Evaluator(data, image_size=8, channels=1, cache_dir=str(tmp_path / "models"), epochs=6, log=logs.append)
    assert logs == []


def test_a_shipped_judge_serves_the_same_images_anywhere_and_only_them(tmp_path, monkeypatch):
    import shutil

    import quality

    monkeypatch.setattr(quality, "SHIPPED_JUDGE", str(tmp_path / "judges" / "judge.pt"))
    data = make_folder(tmp_path / "data")
    trained = Evaluator(data, image_size=8, channels=1, cache_dir=str(tmp_path / "m0"), epochs=2, log=print)
    os.makedirs(tmp_path / "judges")
    trained.ship()
    # a fresh copy of the same images (new file times, so the cache key differs): the shipped judge, untrained
    copy = shutil.copytree(data, tmp_path / "copy", copy_function=shutil.copy)
    logs = []
    ev = Evaluator(str(copy), image_size=8, channels=1, cache_dir=str(tmp_path / "m1"), epochs=2, log=logs.append)
    assert len(logs) == 1 and "the judge shipped" in logs[0] and os.listdir(tmp_path / "m1")
    assert all(torch.equal(a, b) for a, b in zip(ev.net.state_dict().values(), trained.net.state_dict().values()))
    assert ev.heldout_acc == trained.heldout_acc
    # another recipe, or one image changed (as the judge sees it, at 8x8): trained here
    for epochs, cache in ((1, "m2"), (2, "m3")):
        if cache == "m3":
            img = os.path.join(copy, "0", "0.png")
            pixels = np.array(Image.open(img))
            pixels[:6, :6] = 255
            Image.fromarray(pixels).save(img)
        logs = []
        Evaluator(str(copy), image_size=8, channels=1, cache_dir=str(tmp_path / cache), epochs=epochs,
                  log=logs.append)
        assert any("training" in line for line in logs) and not any("the judge shipped" in line for line in logs)


def test_a_large_dataset_trains_its_judge_on_no_more_images_than_max_images(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=60)  # 96 images train the judge
    for max_images, want in ((200, 3), (10_000, 6)):  # 3 epochs see 288 >= 200 images; the cap above 6 epochs: 6
        logs = []
        Evaluator(data, image_size=8, channels=1, cache_dir=str(tmp_path / f"m{max_images}"), epochs=6,
                  max_images=max_images, log=logs.append)
        assert f"training on 96 images for {want} epochs" in logs[0]


def test_the_shipped_judge_fits_the_bundled_digits_and_todays_recipe(tmp_path):
    """Fails when the judge's recipe changes and judges/mnist16.pt is not written again (python quality.py)."""
    from utils import prepare_mnist

    logs = []
    ev = Evaluator(prepare_mnist(str(tmp_path / "mnist")), cache_dir=str(tmp_path / "models"), log=logs.append)
    assert len(logs) == 1 and "the judge shipped" in logs[0]
    assert ev.heldout_acc == pytest.approx(ev.accuracy(torch.cat([ev.real_a, ev.real_b]),
                                                       torch.cat([ev.labels_a, ev.labels_b])))


def test_evaluate_cli_on_a_sample_folder(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "data")
    samples = make_folder(tmp_path / "samples", n_per_class=5, seed=1)
    monkeypatch.chdir(tmp_path)  # the classifier cache goes to ./models
    evaluate.main(["--samples", samples, "--dataset-path", data, "--device", "cpu"])
    out = capsys.readouterr().out
    assert "label accuracy: 1.000" in out and "in-domain FD" in out
    assert "per class (the judge on real held-out images): 0:1.00 (" in out
    assert "confident (the judge's top class at >= 0.9): " in out and "(real held-out images: " in out
    assert "FID (Inception): not computed" in out
    one = make_folder(tmp_path / "one", n_per_class=1, seed=2)
    os.remove(os.path.join(one, "1", os.listdir(os.path.join(one, "1"))[0]))
    beyond = make_folder(tmp_path / "beyond", n_per_class=2, seed=3)
    os.rename(os.path.join(beyond, "1"), os.path.join(beyond, "7"))  # a label the dataset does not have
    for argv, says in ((["--samples", str(tmp_path / "none")], "no such"),
                       (["--samples", one], "at least 2 samples"), (["--samples", beyond], "label 7"),
                       (["--ckpt", "x.pt", "--n", "0"], "--n must be positive")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + ["--dataset-path", data, "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and says in err and len(err.splitlines()) == 1


def test_real_references_are_the_images_as_they_are(tmp_path):
    """No random crop or other augmentation: the same references every time, each the file's image resized."""
    data = make_folder(tmp_path / "data", n_per_class=10)
    evs = [Evaluator(data, image_size=8, channels=1, cache_dir=str(tmp_path / "models"), epochs=1, log=print)
           for _ in range(2)]
    assert torch.equal(evs[0].real_a, evs[1].real_a) and torch.equal(evs[0].real_b, evs[1].real_b)
    first = evs[0].dataset.samples[0][0] if hasattr(evs[0].dataset, "samples") else evs[0].dataset.files[0]
    resized = np.asarray(Image.open(first).convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64)
    from quality import to_float

    mine = (to_float(evs[0].real_images([0])[0])[0, 0].numpy() + 1) * 127.5
    assert np.abs(mine - resized).mean() < 8  # antialiased resize vs PIL's bilinear: close, not zoomed


def test_report_names_a_class_the_judge_held_no_image_of():
    r = {"n": 4, "label_acc": 0.5, "class_acc": {0: 1.0, 2: 0.0}, "classifier_class_acc": {0: 0.9, 1: 1.0},
         "histogram": [2, 0, 2], "confident": 0.5, "classifier_confident": 0.9, "fd_n": 4, "fd": 1.0,
         "fd_floor": 1.0, "classifier_acc": 0.9}
    assert "a:1.00 (0.90), c:0.00 (none)" in evaluate.report(r, ["a", "b", "c"])


def test_the_judges_cache_key_follows_its_recipe(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=4)
    recipes = [(version, 16, 1, epochs, 0, share) for version in (1, 2) for epochs in (12, 20) for share in (0.6, 0.8)]
    assert len({Evaluator.cache_key(data, r) for r in recipes}) == len(recipes)
    before = Evaluator.cache_key(data, recipes[0])
    Image.fromarray(np.zeros((12, 12), np.uint8), mode="L").save(os.path.join(data, "0", "extra.png"))
    assert Evaluator.cache_key(data, recipes[0]) != before  # new data, new judge
    before = Evaluator.cache_key(data, recipes[0])
    first = os.path.join(data, "0", sorted(os.listdir(os.path.join(data, "0")))[0])
    os.utime(first, ns=(os.stat(first).st_atime_ns, os.stat(first).st_mtime_ns + 1_000_000))
    assert Evaluator.cache_key(data, recipes[0]) != before  # rewritten in place, same name and size


def test_shift_and_rotate_moves_whole_pixels_and_fills_with_background():
    from quality import shift_and_rotate

    x = -torch.ones(64, 1, 8, 8)
    x[:, :, 3, 3] = 1  # one bright pixel on the background
    out = shift_and_rotate(x, torch.Generator().manual_seed(0), shift=2, degrees=0)
    peaks = [divmod(int(img.argmax()), 8) for img in out[:, 0]]
    assert all(abs(r - 3) <= 2 and abs(c - 3) <= 2 for r, c in peaks) and len(set(peaks)) > 5
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(64), atol=1e-5)  # moved, not blurred
    assert torch.allclose(out.amin(), torch.tensor(-1.0))


def test_fd_on_more_samples_than_references_uses_samples_of_every_label(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=100)
    ev = Evaluator(data, image_size=8, channels=1, cache_dir=str(tmp_path / "models"), epochs=3, log=print)
    real = torch.cat([ev.real_a, ev.real_b])
    labels = torch.cat([ev.labels_a, ev.labels_b])
    order = labels.argsort(stable=True)  # label-major, as sample.py and bench_quality.py write them
    assert len(real) > len(ev.real_a)
    by_label = ev.evaluate(real[order], labels[order])
    first_label_only = ev.evaluate(real[order][: len(ev.real_a)])
    assert by_label["fd_n"] == len(ev.real_a)
    assert by_label["fd"] < first_label_only["fd"] / 3


def test_the_judge_is_the_same_whatever_the_thread_count(tmp_path):
    data = make_folder(tmp_path / "data", n_per_class=100, size=16)
    before, weights = torch.get_num_threads(), []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            ev = Evaluator(data, image_size=16, channels=1, cache_dir=str(tmp_path / f"models{threads}"), epochs=2,
                           log=print)
            assert torch.get_num_threads() == threads  # restored after training
            weights.append(torch.cat([p.flatten() for p in ev.net.state_dict().values() if p.is_floating_point()]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])
