"""Scoring: a checkpoint on labelled pairs, the JSON document and the printed summary."""
from __future__ import annotations

import json

import numpy as np

from hipseg_lib import CLASS_NAMES
from hipseg_lib.checkpoint import load_predictor
from hipseg_lib.evaluate import evaluate_pairs, results_document
from hipseg_lib.folders import format_summary, match_key, summarise
from hipseg_lib.io import find_pairs, load_pair, volume_id_in
from hipseg_lib.metrics import METRICS, evaluate_case


def test_evaluate_pairs_scores_what_the_predictor_predicts(tiny_model, tiny_synth):
    predictor = load_predictor(tiny_model, "cpu", mirror_axes=())
    pairs = find_pairs(tiny_synth).pairs[:2]
    rows = evaluate_pairs(predictor, pairs, keep=True)
    assert [r["id"] for r in rows] == [str(p.id) for p in pairs]
    assert [r["case"] for r in rows] == [p.id.case for p in pairs]
    for row, pair in zip(rows, pairs):
        image, truth = load_pair(pair)
        pred = predictor.labels(image.array, image.affine)
        np.testing.assert_array_equal(row["pred"], pred)
        expected = evaluate_case(pred, truth.array, image.spacing)
        for m in METRICS:
            np.testing.assert_array_equal(row["metrics"][m], expected[m])
    lean = evaluate_pairs(predictor, pairs[:1])
    assert "pred" not in lean[0] and "image" not in lean[0]


def _case(dice):
    return {m: np.array(dice if m in ("dice", "iou") else [1.0] * len(CLASS_NAMES)) for m in METRICS}


def test_results_document_is_json_with_named_classes_per_patient_and_no_nan():
    rows = [{"id": "004_Week0", "case": "004", "metrics": _case([1.0, 0.9, 0.8, np.nan, 0.5, 0.25])},
            {"id": "004_Week1", "case": "004", "metrics": _case([1.0, 0.7, 0.6, 0.4, 0.5, 0.75])},
            {"id": "007_Week0", "case": "007", "metrics": _case([1.0, 0.6, 0.6, 0.4, 0.9, 0.5])}]
    doc = json.loads(json.dumps(results_document(rows, {"preset": "cpu"})))
    assert doc["classes"] == list(CLASS_NAMES) and doc["preset"] == "cpu"
    assert doc["cases"][0]["metrics"]["dice"]["bladder"] is None  # NaN: absent from both
    assert doc["cases"][1]["metrics"]["dice"]["prostate"] == 0.75 and doc["cases"][2]["case"] == "007"
    body = doc["per_patient"]["dice"]["body"]
    assert "background" not in doc["per_patient"]["dice"]
    assert body["patients"] == {"004": 0.8, "007": 0.6} and abs(body["mean"] - 0.7) < 1e-9
    assert body["low"] <= body["mean"] <= body["high"] and body["high"] > body["low"]
    assert abs(body["volume_mean"] - 2.2 / 3) < 1e-9


def test_format_summary_prints_every_metric_and_foreground_class():
    summary = summarise([_case([1.0, 0.9, 0.8, np.nan, 0.5, 0.25])])
    text = format_summary(summary).splitlines()
    assert all(n in text[1] for n in CLASS_NAMES[1:]) and "background" not in text[1]
    assert [line.split()[0] for line in text[3:]] == list(METRICS)
    assert "0.250 (0.000)" in text[3] and "n/a" in text[3]  # dice row; bladder has no value
    assert text[5].startswith("hd95 mm")


def test_one_name_parser_pairs_predictions_with_truths():
    assert str(volume_id_in("Case_004_Week0_LFOV_pred.nii.gz")) == "004_Week0"
    assert match_key(__import__("pathlib").Path("B006_Week3_SEMANTIC.nii.gz")) == "B006_Week3"
    assert match_key(__import__("pathlib").Path("scan_pred.nii.gz")) == "scan"  # no case and week
    assert volume_id_in("notes.txt") is None


def test_each_patient_row_is_the_mean_of_its_volumes_and_millimetres_get_one_decimal():
    from hipseg_lib.evaluate import each_patient_rows
    from hipseg_lib.viz import html_table

    rows = [{"id": "004_Week0", "case": "004", "metrics": _case([1.0, 0.9, 0.8, np.nan, 0.5, 0.25])},
            {"id": "004_Week1", "case": "004", "metrics": _case([1.0, 0.7, 0.6, 0.4, 0.5, 0.75])},
            {"id": "007_Week0", "case": "007", "metrics": _case([1.0, 0.6, 0.6, 0.4, 0.9, 0.5])}]
    each = each_patient_rows(rows)
    assert [(r["patient"], r["volumes"]) for r in each] == [("004", 2), ("007", 1)]
    assert each[0]["body"] == 0.8 and each[0]["bladder"] == 0.4 and each[1]["prostate"] == 0.5
    assert "background" not in each[0]
    html = html_table([{"HD95 (mm)": 4.399, "Dice": 0.98765}]).data
    assert "<td>4.4</td>" in html and "<td>0.988</td>" in html


def test_an_interval_over_three_patients_is_their_range_and_over_many_it_is_not():
    from hipseg_lib.evaluate import is_range, patient_rows
    from hipseg_lib.metrics import per_patient_summary

    rng = np.random.default_rng(1)

    def rows(n):
        return [{"id": f"{p:03d}_Week0", "case": f"{p:03d}", "metrics": _case([1.0, *rng.uniform(0.5, 1.0, 5)])}
                for p in range(n)]

    three, many = rows(3), rows(30)
    assert is_range(per_patient_summary(three, "dice"))
    assert not is_range(per_patient_summary(many, "dice"))
    assert "Dice range (= 95 % CI)" in patient_rows(three)[0]
    assert "Dice 95 % CI" in patient_rows(many)[0]
