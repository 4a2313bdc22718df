"""Learned estimators vs the exact DiKL generator gradient on the toy suite."""

from fastratio.estimators import gradient_bias


def test_ratio_network_recovers_the_exact_dikl_gradient():
    report = gradient_bias(train_steps=2000)
    # Equal auxiliary budget: one ratio net vs teacher + fake score (within 3 %).
    assert abs(report["vsd_params"] / report["ratio_params"] - 1) < 0.03
    print(f"\ngenerator-gradient cosine to exact DiKL: ratio {report['ratio_theta_cosine']:.3f} "
          f"({report['ratio_params']} params), two-score VSD {report['vsd_theta_cosine']:.3f} ({report['vsd_params']} params)")
    assert report["ratio_theta_cosine"] >= 0.9
    assert 0 < report["vsd_theta_cosine"] <= 1
