"""Report sections of multi-label and ordinal runs (:func:`medxfer.evaluation.report.write_report` adds them).

Multi-label: a table per finding (positives, AUC and average precision with CIs, sensitivity and
specificity at the finding's validation threshold, calibration error, a note where a finding is too
rare to evaluate) with the macro / micro aggregates, and a grid of ROC curves. Ordinal: quadratic
weighted kappa, MAE and accuracy with CIs, and the AUC of every "grade >= k" cut.
"""

from __future__ import annotations

import numpy as np

from medxfer.evaluation import html, plots


def findings_section(run, figs, y: np.ndarray, probs: np.ndarray) -> str:
    test, val = run.metrics.get("test", {}), run.metrics.get("val", {})
    labels = [str(c) for c in run.model.labels]
    rows = []
    for name in labels:
        r, v = test.get("per_label", {}).get(name, {}), val.get("per_label", {}).get(name, {})
        rows.append([html.esc(name), r.get("n_pos", "–"), html.with_ci(r, "auc") if r.get("auc") is not None else "–",
                     html.with_ci(r, "average_precision") if r.get("average_precision") is not None else "–",
                     html.with_ci(r, "sensitivity") if r.get("sensitivity") is not None else "–",
                     html.with_ci(r, "specificity") if r.get("specificity") is not None else "–",
                     html.num(r.get("threshold")), html.num(r.get("ece")), html.num(v.get("auc")),
                     "" if r.get("evaluable", True) else "too rare to evaluate"])
    table = html.table(["finding", "test positives", "AUC (95% CI)", "average precision", "sensitivity",
                        "specificity", "threshold", "ECE", "validation AUC", "note"], rows)
    agg = html.table(["aggregate", "test (95% CI)", "validation"],
                     [[n, html.with_ci(test, k) if test.get(k) is not None else "–", html.num(val.get(k))]
                      for k, n in (("macro_auc", "macro AUC"), ("micro_auc", "micro AUC"),
                                   ("macro_average_precision", "macro average precision"), ("macro_f1", "macro F1"),
                                   ("subset_accuracy", "subset accuracy"), ("hamming_loss", "Hamming loss"))])
    n_rare = sum(1 for r in test.get("per_label", {}).values() if not r.get("evaluable", True))
    note = (f"<p class='note'>{n_rare} finding(s) have fewer than 10 positive or negative test images: their AUC "
            "and interval are shown only to tell how uncertain they are.</p>" if n_rare else "")
    boot = (f"<p class='muted'>95% percentile bootstrap intervals, {test.get('n_bootstrap')} resamples by "
            f"{html.esc(test.get('bootstrap_unit', 'patient' if run.split is not None and 'patient_id' in run.split else 'image'))}"
            "; thresholds and temperatures per finding chosen on validation.</p>" if test.get("n_bootstrap") else "")
    grid = figs("roc_findings", plots.roc_grid_figure(y, probs, labels, test.get("thresholds")),
                "ROC per finding on the test split; red circle: the finding's validation threshold.")
    return table + note + agg + boot + grid


def ordinal_section(run) -> str:
    test, val = run.metrics.get("test", {}), run.metrics.get("val", {})
    body = html.table(["metric", "test (95% CI)", "validation"],
                      [[n, html.with_ci(test, k) if test.get(k) is not None else "–", html.num(val.get(k))]
                       for k, n in (("qwk", "quadratic weighted kappa"), ("mae", "mean absolute error (grades)"),
                                    ("accuracy", "exact-grade accuracy"), ("cut_auc_macro", "mean AUC of the cuts"))])
    cuts = test.get("cuts") or []
    if cuts:
        body += "<h3>Cuts: grade >= k</h3>" + html.table(
            ["cut", "test AUC (95% CI)"], [[html.esc(str(c.get("name", c.get("cut")))),
                                           html.with_ci(c, "auc") if c.get("auc") is not None else "–"] for c in cuts])
    return body + ("<p class='muted'>The predicted grade is the median of the calibrated grade probabilities (it "
                   "minimises the expected absolute error).</p>")
