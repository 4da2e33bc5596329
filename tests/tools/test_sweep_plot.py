import json

from tools.sweep_plot import plot, sweep_points


def _run(lr, bs, loss):
    return {"rev": f"r{lr}{bs}", "name": f"exp-{lr}-{bs}", "data": {
        "params": {"params.yaml": {"data": {"train": {"learning_rate": lr, "per_device_batch_size": bs}}}},
        "metrics": {"reports/train/metrics.json": {"data": {"train_loss": loss}}}}}


def test_points_grouped_by_batch_size_and_sorted_by_lr(tmp_path):
    # DVC nests experiments under their baseline commit
    exp = [{"rev": "workspace", "data": {"params": None, "metrics": None}},
           {"rev": "abc", "data": _run(1e-3, 4, 2.0)["data"],
            "experiments": [{"revs": [_run(2e-4, 4, 2.3)]}, {"revs": [_run(1e-4, 2, 2.5)]},
                            {"revs": [{"rev": "broken", "data": {"params": {}, "metrics": {}}}]}]}]
    points = sweep_points(exp)
    assert points == {2: [(1e-4, 2.5)], 4: [(2e-4, 2.3), (1e-3, 2.0)]}
    out = tmp_path / "sweep.png"
    plot(points, out)
    assert out.stat().st_size > 1000


def test_no_usable_runs_is_an_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="no experiment"):
        plot(sweep_points(json.loads("[]")), tmp_path / "x.png")
