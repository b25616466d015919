"""Evaluation: metrics with bootstrap intervals, calibration and thresholds, strategy comparison.

``report.py`` (HTML report and plots) lives here too but is imported on its own, so that this
package does not pull in matplotlib.
"""

from medxfer.evaluation.calibration import (
    apply_temperature,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    parse_threshold_rule,
    reliability_curve,
)
from medxfer.evaluation.metrics import bootstrap_weights, evaluate
from medxfer.evaluation.stats import delong_test, paired_bootstrap, summarize

__all__ = [
    "apply_temperature",
    "bootstrap_weights",
    "choose_threshold",
    "delong_test",
    "evaluate",
    "expected_calibration_error",
    "fit_temperature",
    "paired_bootstrap",
    "parse_threshold_rule",
    "reliability_curve",
    "summarize",
]
