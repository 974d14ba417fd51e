"""Inference options: Gaussian window blending, test-time mirroring, largest-component
post-processing, probabilities and entropy (known answers with stub networks)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from hipseg_lib import BLADDER, BODY, BONES, NUM_CLASSES, PROSTATE, HipsegError
from hipseg_lib.checkpoint import load_predictor
from hipseg_lib.io import find_pairs, load_volume
from hipseg_lib.predict import predict_files, prediction_name, probabilities_name
from hipseg_lib.predictor import (
    InferenceSettings,
    Predictor,
    entropy,
    gaussian_weight,
    keep_largest_component,
    labels_from_probabilities,
    plan_windows,
    window_starts,
)
from hipseg_lib.preprocess import Preprocessing


class Stub:
    """A stand-in backend: ``score`` turns images ``(N, 1, X, Y, Z)`` into class scores (numpy)."""

    divisor = 1

    def __init__(self, score):
        self.score = score

    def __call__(self, x):
        return self.score(np.asarray(x, np.float32)).astype(np.float32)


def pointwise():
    """A 1x1x1 convolution: translation-equivariant and mirror-symmetric."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=NUM_CLASSES), rng.normal(size=NUM_CLASSES)
    return Stub(lambda x: w[None, :, None, None, None] * x + b[None, :, None, None, None])


def _scores(x, fill=-30.0):
    return np.full((x.shape[0], NUM_CLASSES, *x.shape[2:]), fill, np.float32)


def copy_input(x):
    """Class 1 scores the intensity itself: equivariant under flips, but the input is not symmetric."""
    out = _scores(x, 0.0)
    out[:, 1] = 3 * x[:, 0]
    return out


def ramp(x):
    """Class 1 scores the position along axis 0 (ignores the input): not mirror-symmetric."""
    out = _scores(x)
    out[:, 0] = 0
    out[:, 1] = np.linspace(-2, 2, x.shape[2])[:, None, None]
    return out


PREP = Preprocessing(target_shape=(16, 16, 8), crop_foreground=False)


def predictor(backend, **settings):
    return Predictor(backend, PREP, InferenceSettings(**settings))


def scan(seed=0):
    return np.random.default_rng(seed).normal(100, 30, (20, 18, 10)).astype(np.float32)


def test_gaussian_weight_is_symmetric_and_peaks_at_the_centre():
    for patch in [(9, 7, 5), (8, 8, 4)]:
        w = gaussian_weight(patch)
        assert w.shape == patch and float(w.max()) == pytest.approx(1.0)
        for axis in range(3):
            np.testing.assert_array_equal(w, np.flip(w, axis))
        centre = tuple((p - 1) // 2 for p in patch)
        assert float(w[centre]) == pytest.approx(float(w.max()))
        assert float(w.min()) > 0 and float(w[0, 0, 0]) < 0.01 * float(w[centre])
        line = w[:, centre[1], centre[2]]  # falls off monotonically from the centre along each axis
        assert np.all(line[1:centre[0] + 1] >= line[:centre[0]])


@pytest.mark.parametrize("patch,overlap", [((8, 8, 4), 0.5), ((7, 5, 6), 0.25), ((16, 16, 16), 0.5)])
def test_windows_equal_the_whole_volume_for_a_translation_equivariant_model(patch, overlap):
    backend = pointwise()
    x = np.random.default_rng(1).normal(size=(2, 1, 17, 13, 9)).astype(np.float32)
    whole = backend(x)
    windows = predictor(backend, window=patch, overlap=overlap).grid_scores(x)
    np.testing.assert_allclose(windows, whole, rtol=1e-5, atol=1e-5)
    assert np.array_equal(windows.argmax(1), whole.argmax(1))


def test_windows_cover_the_grid_and_stay_inside_it():
    for shape, patch in [((17, 13, 9), (8, 8, 4)), ((4, 4, 4), (8, 8, 8))]:
        covered = np.zeros(shape, int)
        for w in plan_windows(shape, patch, 0.5):
            covered[w] += 1
            assert all(s.start >= 0 and s.stop <= n for s, n in zip(w, shape))
        assert covered.min() >= 1


def test_window_starts_are_evenly_spaced_from_edge_to_edge_as_nnunet_places_them():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(9, 4, 0.5) == [0, 2, 3, 5], "four windows spaced by (9 - 4) / 3, rounded"
    assert window_starts(64, 48, 0.5) == [0, 16]
    assert window_starts(8, 8, 0.5) == window_starts(5, 8, 0.5) == [0], "one window covers it"
    for size, window, overlap in [(17, 8, 0.5), (100, 32, 0.25), (33, 16, 0.5)]:
        starts = window_starts(size, window, overlap)
        steps = np.diff(starts)
        assert starts[0] == 0 and starts[-1] == size - window
        assert steps.max() <= window * (1 - overlap) and steps.max() - steps.min() <= 1, "even steps"


def test_tta_changes_nothing_for_a_mirror_symmetric_model():
    image = scan()
    for backend in (pointwise(), Stub(copy_input)):  # copy_input: asymmetric input, flips undone
        plain = predictor(backend, mirror_axes=()).probabilities(image, np.eye(4))
        tta = predictor(backend, mirror_axes=(0,)).probabilities(image, np.eye(4))
        np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_tta_undoes_the_flip_known_answer():
    # The ramp says "class 1" on one side and "class 0" on the other; its mirrored copy says the
    # opposite. Averaged, both classes are equally likely everywhere.
    image = scan()
    plain = predictor(Stub(ramp), mirror_axes=()).probabilities(image, np.eye(4))
    tta = predictor(Stub(ramp), mirror_axes=(0,)).probabilities(image, np.eye(4))
    assert plain[1].max() > 0.8 and plain[1].min() < 0.2
    np.testing.assert_allclose(tta[0], 0.5, atol=1e-5)
    np.testing.assert_allclose(tta[1], 0.5, atol=1e-5)


def half_sure(x):
    """Class 1 has logit 4 on the first half of axis 0 and 0 on the other, class 0 logit 0: one copy
    is sure (p = 0.982), its mirror undecided (p = 0.5)."""
    out = _scores(x)
    out[:, 0] = 0
    out[:, 1] = 0
    out[:, 1, : x.shape[2] // 2] = 4.0
    return out


def test_tta_averages_the_probabilities_not_the_logits():
    """Mean of softmax: (0.982 + 0.5) / 2 = 0.741. The mean of the logits (or a geometric mean of
    the probabilities) would give 0.881: this stub tells them apart, where the ramp cannot."""
    tta = predictor(Stub(half_sure), mirror_axes=(0,)).probabilities(scan(), np.eye(4))
    sure = 1 / (1 + np.exp(-4.0))
    away_from_the_middle = np.r_[0:7, 13:20]  # axis 0 of the 20-voxel scan; the step blurs between
    np.testing.assert_allclose(tta[1][away_from_the_middle], (sure + 0.5) / 2, atol=1e-4)
    assert abs(float(tta[1][away_from_the_middle].mean()) - 1 / (1 + np.exp(-2.0))) > 0.1


def test_gaussian_blending_is_the_weighted_mean_of_the_windows_known_answer():
    """A stub whose output depends on the window: class 1 scores the voxel's index inside its window.
    Two windows of 8 along axis 0 (starts 0 and 4) overlap on voxels 4..7: there the blend is
    sum(g * index) / sum(g) with nnU-Net's Gaussian, sigma = 1/8 of the window (= 1 voxel)."""
    def local_index(x):
        out = _scores(x, 0.0)
        out[:, 1] = np.arange(x.shape[2], dtype=np.float32)[:, None, None]
        return out

    x = np.zeros((1, 1, 12, 1, 1), np.float32)
    got = predictor(Stub(local_index), window=(8, 1, 1), overlap=0.5).grid_scores(x)[0, 1, :, 0, 0]
    g = np.exp(-0.5 * ((np.arange(8) - 3.5) / (8 * 0.125)) ** 2)
    expected = []
    for v in range(12):
        parts = [(g[v - s], v - s) for s in (0, 4) if 0 <= v - s < 8]
        expected.append(sum(w * i for w, i in parts) / sum(w for w, _ in parts))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    plain_mean = [(v + (v - 4)) / 2 for v in range(4, 8)]
    assert not np.allclose(got[4:8], plain_mean, atol=1e-3), "the Gaussian weighs the window centres"


def test_probabilities_sum_to_one_and_match_the_label(tiny_model, tiny_synth):
    vol = load_volume(find_pairs(tiny_synth).pairs[0].image)
    for axes in ((), (0,)):
        probs = load_predictor(tiny_model, "cpu", mirror_axes=axes).probabilities(vol.array, vol.affine)
        assert probs.shape == (NUM_CLASSES, *vol.shape) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        u = entropy(probs)
        assert u.shape == vol.shape
        np.testing.assert_allclose(u, -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(0) / np.log(NUM_CLASSES),
                                   atol=1e-5)
    np.testing.assert_array_equal(labels_from_probabilities(probs, postprocess=False), probs.argmax(0))


def test_entropy_is_zero_when_certain_and_one_when_all_classes_are_equally_likely():
    certain = np.zeros((NUM_CLASSES, 2, 2, 2), np.float32)
    certain[3] = 1
    uniform = np.full((NUM_CLASSES, 2, 2, 2), 1 / NUM_CLASSES, np.float32)
    two = np.zeros((NUM_CLASSES, 1), np.float32)
    two[:2] = 0.5  # two classes at even odds: log 2 / log 6
    np.testing.assert_allclose(entropy(certain), 0, atol=1e-6)
    np.testing.assert_allclose(entropy(uniform), 1, rtol=1e-6)
    np.testing.assert_allclose(entropy(two), np.log(2) / np.log(NUM_CLASSES), rtol=1e-6)


def test_keep_largest_component_per_class_and_never_other_classes():
    lab = np.full((12, 12, 12), BODY, np.uint8)
    lab[1:5, 1:5, 1:5] = BLADDER          # 64 voxels
    lab[8:10, 8:10, 8:10] = BLADDER       # 8 voxels: removed
    lab[1:3, 9:11, 1:3] = PROSTATE        # 8 voxels: kept (the only piece)
    lab[6, 1, 1] = BONES                  # two separate bone pieces: bones are not listed
    lab[1, 6, 9] = BONES
    out = keep_largest_component(lab, (BLADDER, PROSTATE), fill=BODY)
    assert (out[1:5, 1:5, 1:5] == BLADDER).all()
    assert (out[8:10, 8:10, 8:10] == BODY).all()
    assert (out[1:3, 9:11, 1:3] == PROSTATE).all()
    assert (out == BONES).sum() == 2
    changed = out != lab
    assert changed.sum() == 8
    # touching diagonally is one piece (26-neighbourhood)
    diag = np.zeros((4, 4, 4), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = BLADDER
    assert (keep_largest_component(diag, (BLADDER,)) == diag).all()


def test_largest_pieces_that_tie_are_all_kept_in_any_orientation():
    """Two equal largest pieces both stay, whichever way the array is stored (keeping the first
    found would keep a different one after a flip); a larger piece still wins over both."""
    lab = np.zeros((9, 3, 3), np.uint8)
    lab[0, 1, 1] = lab[4, 1, 1] = PROSTATE
    out = keep_largest_component(lab, (PROSTATE,), fill=BODY)
    assert out[0, 1, 1] == PROSTATE and out[4, 1, 1] == PROSTATE
    flipped = keep_largest_component(lab[::-1].copy(), (PROSTATE,), fill=BODY)
    np.testing.assert_array_equal(flipped[::-1], out)
    lab[6:9, 1, 1] = PROSTATE  # now one piece of 3 is the largest: the two single voxels go
    out = keep_largest_component(lab, (PROSTATE,), fill=BODY)
    assert out[0, 1, 1] == out[4, 1, 1] == BODY and (out[6:9, 1, 1] == PROSTATE).all()


def test_removed_voxels_take_their_next_most_probable_class():
    lab = np.zeros((10, 1, 1), np.uint8)
    lab[0:4] = BLADDER
    lab[7] = BLADDER
    probs = np.zeros((NUM_CLASSES, 10, 1, 1), np.float32)
    probs[BLADDER] = 0.6
    probs[BONES] = 0.3
    probs[BODY] = 0.1
    out = keep_largest_component(lab, (BLADDER,), probabilities=probs)
    assert out[7, 0, 0] == BONES and (out[0:4] == BLADDER).all() and (out[[4, 5, 6, 8, 9]] == 0).all()


def test_predict_files_writes_probabilities_and_refuses_to_overwrite(tiny_model, tiny_synth, tmp_path):
    pair = find_pairs(tiny_synth).pairs[0]
    out = tmp_path / "pred"
    # without post-processing the label map is the arg-max of the probabilities written beside it
    plain = load_predictor(tiny_model, "cpu", postprocess=False)
    written = predict_files(plain, [pair.image], out, progress=False, probabilities=True)
    label = nib.load(written[0])
    probs_path = out / probabilities_name(pair.image)
    probs = nib.load(probs_path)
    src = nib.load(pair.image)
    assert probs.shape == (*src.shape, NUM_CLASSES) and np.allclose(probs.affine, src.affine)
    assert probs.get_data_dtype() == np.uint16  # two bytes a value, read back as floats
    p = probs.get_fdata(dtype=np.float32)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-3)
    assert (p.argmax(-1) == np.asanyarray(label.dataobj)).mean() > 0.999
    # Only the probabilities exist: nothing is written, the label map is not remade.
    (out / prediction_name(pair.image)).unlink()
    stamp = probs_path.stat().st_mtime_ns
    with pytest.raises(HipsegError, match="_probs.nii.gz: already exists"):
        predict_files(plain, [pair.image], out, progress=False, probabilities=True)
    assert not (out / prediction_name(pair.image)).exists() and probs_path.stat().st_mtime_ns == stamp
    predict_files(plain, [pair.image], out, progress=False, probabilities=True, overwrite=True)
    assert (out / prediction_name(pair.image)).exists()


def test_predict_cli_options(tiny_model, tiny_synth, tmp_path):
    from hipseg_lib.cli import main

    pair = find_pairs(tiny_synth).pairs[0]
    assert main(["predict", "--checkpoint", str(tiny_model), str(pair.image), "--out", str(tmp_path / "a"),
                 "--device", "cpu", "--no-tta", "--postprocess", "--probabilities", "--quiet"]) == 0
    assert (tmp_path / "a" / probabilities_name(pair.image)).exists()
    assert main(["predict", "--checkpoint", str(tiny_model), str(pair.image), "--out", str(tmp_path / "b"),
                 "--device", "cpu", "--quiet"]) == 0
    assert not (tmp_path / "b" / probabilities_name(pair.image)).exists()


def test_compare_inference_scores_every_variant(tiny_model, tiny_synth):
    from hipseg_lib.calibration import organ_uncertainty, reliability_counts
    from hipseg_lib.inference_options import VARIANTS, chosen_settings, compare_inference, inference_table

    predictor = load_predictor(tiny_model, "cpu")
    pairs = find_pairs(tiny_synth).pairs[:2]
    comp = compare_inference(predictor, pairs)
    assert list(comp["results"]) == [n for n, _, _ in VARIANTS]
    assert chosen_settings(predictor, "post-processing") == InferenceSettings(mirror_axes=(), postprocess=True)
    assert chosen_settings(predictor, "TTA") == InferenceSettings(mirror_axes=(0,), postprocess=False)
    for name, tta, post in VARIANTS:
        rows = comp["results"][name]
        assert [r["id"] for r in rows] == [str(p.id) for p in pairs]
        assert len(comp["seconds"][name]) == len(pairs), "seconds per volume, for each volume"
        for r in rows:
            axes = (0,) if tta else ()
            single = predictor.replace(mirror_axes=axes).probabilities(r["image"], load_volume(pairs[0].image).affine) \
                if r["id"] == str(pairs[0].id) else None
            if single is not None:  # the same label map as predicting that way directly
                np.testing.assert_array_equal(r["pred"], labels_from_probabilities(single, post))
    assert len(comp["entropy"]["TTA"]) == 2 and comp["entropy"]["TTA"][0].dtype == np.float16
    # the reference variant's calibration counts and organ uncertainty, as computed directly
    vol = load_volume(pairs[0].image)
    probs = predictor.replace(mirror_axes=(0,)).probabilities(vol.array, vol.affine)
    truth = comp["results"]["TTA"][0]["truth"]
    pred = comp["results"]["TTA"][0]["pred"]
    first = reliability_counts(probs, truth, (truth > 0) | (pred > 0))
    assert comp["calibration"]["TTA"][:, 2].sum() > first[:, 2].sum() > 0, "two volumes' counts add up"
    np.testing.assert_allclose(comp["organ_uncertainty"]["TTA"][0],
                               organ_uncertainty(entropy(probs), pred, range(1, 6)), atol=1e-3)
    table = inference_table(comp, "dice")
    assert [r["inference"] for r in table] == [n for n, _, _ in VARIANTS]
    assert "background" not in table[0], "foreground classes only"
    plain = np.nanmean([r["metrics"]["dice"] for r in comp["results"]["plain"]], axis=0)
    np.testing.assert_allclose([table[0][n] for n in ("body", "bones")], plain[1:3])


def _comparison(dice: dict, hd: dict, seconds=(1.0, 2.0, 1.0, 2.0)) -> dict:
    """A compare_inference result whose four variants have the given mean foreground Dice and HD95."""
    from hipseg_lib.inference_options import VARIANTS

    out = {"results": {}, "seconds": {}}
    for (name, _, _), s in zip(VARIANTS, seconds):
        row = {"case": "a", "metrics": {"dice": np.array([1.0, *dice[name]]), "hd95": np.array([0.0, *hd[name]])}}
        out["results"][name], out["seconds"][name] = [row], [s]
    return out


def test_the_inference_rule_decides_from_validation_numbers():
    from hipseg_lib.inference_options import choose_inference

    same = [0.9, 0.8, 0.9, 0.85, 0.8]
    flat = {"plain": same, "TTA": same, "post-processing": same, "TTA + post-processing": same}
    hd = {k: [3.0] * 5 for k in flat}
    assert choose_inference(_comparison(flat, hd))[0] == "TTA", "post-processing that changes nothing stays off"
    worse = dict(flat, TTA=[0.9, 0.8, 0.9, 0.85, 0.79])
    assert choose_inference(_comparison(worse, hd))[0] == "plain", "mirroring that costs a class 0.01 stays off"
    far = dict(hd, **{"post-processing": [3.0, 3.0, 3.0, 3.0, 1.0]})
    name, reasons = choose_inference(_comparison(flat, far))
    assert name == "TTA + post-processing" and "prostate" in reasons[2], "a stray piece removed: HD95 2 mm better"
    hurt = dict(flat, **{"post-processing": [0.9, 0.8, 0.95, 0.85, 0.7]})
    assert choose_inference(_comparison(hurt, hd))[0] == "TTA", "a gain elsewhere does not pay for a loss"
    slight = dict(flat, TTA=[0.9, 0.8, 0.9, 0.85, 0.7985])  # mirroring costs the prostate 0.0015
    assert choose_inference(_comparison(slight, hd))[0] == "TTA", "within the default tolerance, 0.002"
    assert choose_inference(_comparison(slight, hd), tol_dice=0.001)[0] == "plain", "beyond a stricter one"
    assert choose_inference(_comparison(flat, far), tol_hd95_mm=2.5)[0] == "TTA", "2 mm is within 2.5 mm"


def test_postprocessing_changes_lists_removed_pieces():
    from hipseg_lib.inference_options import postprocessing_changes

    before = np.full((6, 6, 4), BODY, np.uint8)
    before[0:3, 0:3, 0:2] = BLADDER
    before[5, 5, 3] = BLADDER
    after = keep_largest_component(before, (BLADDER,))
    rows = postprocessing_changes([{"id": "a", "pred": before}, {"id": "b", "pred": before}],
                                  [{"id": "a", "pred": after}, {"id": "b", "pred": before}])
    assert rows == [{"index": 0, "id": "a", "class": "bladder", "voxels": 1, "slice": 3}]


def test_uncertainty_panel_draws_three_views():
    import matplotlib.pyplot as plt

    from hipseg_lib.viz import uncertainty_panel

    truth = np.zeros((8, 8, 4), np.uint8)
    truth[2:6, 2:6] = PROSTATE
    pred = truth.copy()
    pred[2, 2] = BODY
    fig = uncertainty_panel(np.random.default_rng(0).random((8, 8, 4)), truth, pred, np.zeros((8, 8, 4)), index=1)
    assert len(fig.axes) == 4  # three panels and the entropy colour bar
    assert [a.get_title() for a in fig.axes[:2]] == ["prediction", "errors (cyan)"]
    plt.close(fig)


def test_outside_the_body_crop_is_background_and_inside_is_the_networks():
    """A network that says "body" everywhere: the scan's voxels inside the crop get body, every voxel
    outside it background, whatever the network would have said there."""
    from hipseg_lib.preprocess import preprocess_image

    rng = np.random.default_rng(0)
    image = rng.normal(5, 1, (40, 36, 20)).astype(np.float32)  # air, with noise
    image[8:30, 6:28, 4:16] += 200  # the body
    prep = Preprocessing(target_shape=(16, 16, 8))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS: no turn
    _, box = preprocess_image(image, prep)
    inside = tuple(slice(a, b) for a, b in box)

    def body_everywhere(x):
        out = _scores(x)
        out[:, BODY] = 10.0
        return out

    labels = Predictor(Stub(body_everywhere), prep, InferenceSettings()).labels(image, affine)
    outside = np.ones(image.shape, bool)
    outside[inside] = False
    assert outside.any() and (labels[inside] == BODY).all()
    assert (labels[outside] == 0).all()
