"""Half-precision error of the masked schemes stays within a few times plain's (the float16 check)."""
from __future__ import annotations

import json

from splitinfer import precision


def test_masked_float16_error_within_three_times_plain(tmp_path):
    out = tmp_path / "precision.json"
    assert precision.main(["--model", "preset:smollm2-135m", "--length", "48", "--batch-size", "2", "--ragged",
                           "--seeds", "1,2,3", "--gpu-device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {"optimized", "ours", "otp"}
    assert [len(r["runs"][k]) for k in ("optimized", "ours", "otp")] == [1, 3, 3]
    plain = r["worst_rel_logit_error"]["optimized"]
    assert 0 < plain < 0.02  # float16 rounding, not a broken engine
    for runner in ("ours", "otp"):
        assert r["worst_over_plain"][runner] <= 3.0, (runner, r["worst_over_plain"])
        assert all(run["top1_agreement"] == 1.0 for run in r["runs"][runner])


def test_bad_seeds_are_one_line(capsys):
    assert precision.main(["--seeds", "1,x", "--gpu-device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
