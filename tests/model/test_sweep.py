"""model.sweep scores candidates on validation logits: right answers score high, shuffled labels do not."""

from __future__ import annotations

import numpy as np

from model.sweep import validation_scores


def test_validation_scores_separate_a_good_candidate_from_a_useless_one() -> None:
    """Confident correct logits: accuracy 1, low NLL; the same logits against shuffled labels: neither."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    logits = rng.normal(0.0, 0.5, size=(len(y), 3))
    logits[np.arange(len(y)), y] += 4.0
    good = validation_scores(logits, y)
    bad = validation_scores(logits, rng.permutation(y))
    assert good["n"] == len(y) and good["accuracy"] == 1.0 and good["macro_f1"] == 1.0
    assert good["nll"] < 0.1 < bad["nll"]
    assert bad["accuracy"] < 0.6 and bad["macro_f1"] < 0.6
    assert good["temperature"] > 0 and 0.0 <= good["ece"] <= 1.0
