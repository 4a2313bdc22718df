"""bench/paper_claims.py end to end on sklearn digits: two methods, a tiny budget, a tiny feature extractor."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from testkit import tiny_feature_extractor

from fastratio.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "paper_claims"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_claims = _bench


def test_paper_claims_tiny_digits_end_to_end(tmp_path, capsys):
    claims = _claims()
    args = ["--data", "digits", "--methods", "dijs", "vsd", "--seeds", "1", "--n", "48", "--budget-minutes", "0.4",
            "--feature-extractor", tiny_feature_extractor(16), "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "claims.json"), "--figure", str(tmp_path / "claims.png"), "--device", "cpu"]
    assert claims.main(args) == 0
    result = json.loads((tmp_path / "claims.json").read_text())
    plan = result["plan"]
    # The budget set the plan: teacher at most a fifth of it at the measured step time, equal
    # generator steps for both methods, multiples of 10 and at most the configs' steps.
    assert plan["teacher_steps"] % 10 == 0 and plan["steps"] % 10 == 0 and 10 <= plan["steps"] <= 1000
    assert plan["teacher_steps"] * plan["seconds_per_step"]["teacher"] <= 0.2 * 0.4 * 60 or plan["teacher_steps"] == 10
    rows = {(r["method"], r["best_of"]): r for r in result["rows"]}
    assert set(rows) == {("real_train", 1), ("teacher_heun", 1), ("generator_init", 1), ("dijs", 1), ("vsd", 1),
                         ("dijs", 2), ("dijs", 4), ("dijs", 8), ("dijs", 16)}
    assert rows[("dijs", 1)]["images_seen"] == rows[("vsd", 1)]["images_seen"] == plan["steps"] * 128
    assert rows[("teacher_heun", 1)]["nfe"] == 35 and result["test_images"] == 360
    for row in result["rows"]:
        assert row["fid"] >= 0 and row["kid_std"] >= 0 and 0 <= row["class_entropy"] <= 2.31 and 1 <= row["classes_covered"] <= 10
    # Real train images are the yardstick: closer to the test split than a briefly trained generator.
    assert rows[("real_train", 1)]["energy_distance"] < rows[("dijs", 1)]["energy_distance"]
    assert rows[("real_train", 1)]["classes_covered"] == 10 and result["classifier_test_accuracy"] > 0.8
    assert (tmp_path / "claims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| dijs | 1 |" in table and "| vsd | 1 |" in table and "| (2) ratio (DiJS) beats two scores (VSD) |" in table
    verdicts = {c["claim"]: c["verdict"] for c in result["claims"]}
    assert verdicts["(1a) DiJS beats DiKL"] == "not measured"  # DiKL was not run
    # --report prints the same tables from the results file alone.
    assert claims.main(args + ["--report"]) == 0
    assert capsys.readouterr().out.strip() in table

    # bench/verifier_study.py on the DiJS run: every net, rule and N measured, in one JSON.
    study = _bench("verifier_study")
    ckpt = max((tmp_path / "runs" / "digits" / "dijs-seed0").glob("ckpt-*.pt"))
    assert study.main([str(ckpt), "--n", "8", "--refit-steps", "50", "--feature-extractor", tiny_feature_extractor(16),
                       "--device", "cpu", "--out", str(tmp_path / "verifier.json")]) == 0
    found = json.loads((tmp_path / "verifier.json").read_text())
    assert len(found["refit"]["loss_every_50"]) == 1 and found["step"] == plan["steps"]
    assert {(r["net"], r["sigma"]) for r in found["calibration"]} == \
           {(net, s) for net in ("ema", "live", "refit") for s in (*study.SIGMA_GRID, "default")}
    assert all(0 <= r["auc"] <= 1 for r in found["calibration"])
    assert len(found["best_of"]) == 1 + 3 * 2 * len(study.BEST_OF) + len(study.SIGMA_GRID)
    assert all(r["fid"] >= 0 and 1 <= r["classes_covered"] <= 10 for r in found["best_of"])
    assert all(abs(sum(shares) - 1) < 0.01 for shares in found["picks"].values())
    capsys.readouterr()

    # A rerun reuses the plan, the finished runs and the measures: same rows, no training.
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("ckpt-*.pt")}
    assert claims.main(args) == 0
    again = json.loads((tmp_path / "claims.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("ckpt-*.pt")} == ckpts
    assert len(again["invocations"]) == 2 and again["plan"] == plan
    strip = ("train_seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in again["rows"]] == \
           [{k: v for k, v in r.items() if k not in strip} for r in result["rows"]]


def test_a_sweep_gives_each_family_its_best_candidate_before_the_comparison(tmp_path, capsys):
    """--sweep-steps: VSD's six candidates (weighting x smallest sigma) train at seed 0, the lowest FID is
    chosen, and the comparison's VSD run trains with those overrides in its own folder."""
    claims = _claims()
    args = ["--data", "digits", "--methods", "vsd", "--seeds", "1", "--n", "24", "--steps", "2", "--teacher-steps", "10",
            "--sweep-steps", "2", "--feature-extractor", tiny_feature_extractor(16), "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "claims.json"), "--figure", str(tmp_path / "claims.png"), "--device", "cpu"]
    assert claims.main(args) == 0
    result = json.loads((tmp_path / "claims.json").read_text())
    sweep = result["sweep"]
    assert [r["candidate"] for r in sweep["rows"]] == list(claims.SWEEP["vsd"]) and all(r["steps"] == 2 for r in sweep["rows"])
    best = min((r for r in sweep["rows"] if "fid" in r), key=lambda r: r["fid"])["candidate"]
    assert sweep["chosen"] == {"vsd": best}
    assert result["methods"]["vsd"] == claims.METHODS["vsd"] + claims.SWEEP["vsd"][best]
    from fastratio import config

    cfg = config.load(tmp_path / "runs" / "digits" / f"vsd[{best}]-seed0" / "config.yaml")
    weighting, smin = best.split("_")
    assert cfg.noise.weighting == weighting[2:] and f"smin{cfg.noise.sigma_min:g}" == smin and cfg.run.steps == 2
    assert len(result["invocations"]) == 1
    # --report shows the sweep beside the comparison, the chosen candidate in bold.
    capsys.readouterr()
    assert claims.main(args + ["--report"]) == 0
    report = capsys.readouterr().out
    assert f"| vsd | **{best}** |" in report and report.count("| vsd | w=") == len(claims.SWEEP["vsd"]) - 1

    # --configurations-from: another campaign (here the same data, another results file) takes the
    # sweep's choice without sweeping; the finished run of that configuration is reused.
    i = args.index("--sweep-steps")
    other = [a if a != str(tmp_path / "claims.json") else str(tmp_path / "other.json") for a in args[:i] + args[i + 2:]]
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("ckpt-*.pt")}
    assert claims.main(other + ["--configurations-from", str(tmp_path / "claims.json")]) == 0
    taken = json.loads((tmp_path / "other.json").read_text())
    assert taken["methods"] == result["methods"] and taken["sweep"]["chosen"] == {"vsd": best} and taken["sweep"]["rows"] == []
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("ckpt-*.pt")} == ckpts
    assert f"chosen by the sweep of {tmp_path / 'claims.json'}: vsd {best}" in claims.report(taken)
    bad = tmp_path / "bad.json"
    for candidate in ("w=unknown", ["w=none_smin0.02"]):
        bad.write_text(json.dumps({"sweep": {"chosen": {"vsd": candidate}}}))
        with pytest.raises(UserError, match=rf"sweep.chosen.vsd = {re.escape(repr(candidate))} is not a candidate here"):
            claims.main(other + ["--configurations-from", str(bad)])
    with pytest.raises(UserError, match=r"--configurations-from .*missing.json: no sweep's choice readable"):
        claims.main(other + ["--configurations-from", str(tmp_path / "missing.json")])


def test_paper_claims_missing_data_file_is_one_line(tmp_path):
    claims = _claims()
    missing = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with pytest.raises(UserError, match=f"{missing} not found; put MNIST's IDX files"):
        claims.main(["--data", "mnist", "--out-dir", str(tmp_path), "--set", f"data.path={missing}"])


def test_verdicts_are_confirmed_reversed_or_not_confirmed_against_the_seed_spread():
    compare = _claims()._compare_both
    row = lambda fid, kid, std, n: {"fid": (fid, std, n), "kid": (kid, std / 1000, n)}
    summary = {"a": row(10.0, 0.010, 1.0, 3), "b": row(13.0, 0.013, 1.0, 3), "close": row(11.5, 0.0115, 1.0, 3),
               "one": row(10.0, 0.010, 0.0, 1), "other": row(20.0, 0.020, 0.0, 1), "ref": row(30.0, 0.03, 0.0, 1),
               "kid_only": {"fid": (10.0, 1.0, 3), "kid": (0.020, 0.001, 3)}}
    assert compare(summary, "a", "b")[0] == "confirmed"            # 10 + 1 < 13 - 1, in FID and KID
    assert compare(summary, "b", "a")[0] == "reversed"
    verdict, evidence = compare(summary, "a", "close")            # 10 + 1 > 11.5 - 1
    assert verdict == "not confirmed" and "within the spread" in evidence
    verdict, evidence = compare(summary, "one", "other")          # one seed each: no spread, no verdict
    assert verdict == "not confirmed" and "no spread: one lower" in evidence
    assert compare(summary, "a", "ref")[0] == "confirmed"         # a once-measured reference: a's spread decides
    verdict, evidence = compare(summary, "kid_only", "b")         # FID confirms, KID reverses
    assert verdict == "not confirmed" and "(FID: confirmed, KID: reversed)" in evidence
    assert compare(summary, "a", "missing") == ("not measured", "missing has no samples (diverged or not run)")


def test_the_study_keeps_the_most_real_or_resamples_in_proportion_to_exp_realness():
    select = _bench("verifier_study").select
    score = torch.tensor([[0.0, 3.0, 1.0, 9.0], [2.0, 0.0, 0.0, 0.0]])
    assert select(score, 4, "max", 0).tolist() == [3, 0] and select(score, 2, "max", 0).tolist() == [1, 0]
    # Resampling: P(i) = exp(s_i) / sum_j exp(s_j) among the first N candidates.
    draws = torch.stack([select(torch.log(torch.tensor([[1.0, 3.0, 0.0, 0.0]])), 3, "resample", seed) for seed in range(4000)])
    share = torch.bincount(draws.reshape(-1), minlength=4).double() / 4000
    assert abs(share[1] - 0.75) < 0.03 and abs(share[0] - 0.25) < 0.03 and share[2:].sum() == 0
