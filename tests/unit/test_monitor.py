"""Monitor writes scalars, layer-weight histograms/images and the recipe; read back with TensorBoard."""
from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsembed.config import recipe_from_dict
from dsembed.training.monitor import Monitor


def read_events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_histograms_images_and_recipe_round_trip(tmp_path, capsys):
    recipe = recipe_from_dict({"train": {"max_steps": 3}})
    monitor = Monitor(tmp_path, recipe, total_steps=3, enabled=True)
    monitor.log_recipe(recipe.to_yaml())
    monitor.log_scalars(1, {"train/loss": 2.5, "train/lr": torch.tensor(1e-4)})
    monitor.log_scalars(2, {"train/loss": 1.5, "train/lr": 2e-4})
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # W for layers 2, 3, 4
    monitor.log_layer_weights(2, weights, [2, 3, 4])
    monitor.update(3)
    monitor.close()
    monitor.close()  # twice is fine

    acc = read_events(tmp_path / "tensorboard")
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 1.5)]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-4)
    for index, row in zip([2, 3, 4], weights):
        event = acc.Scalars(f"layer_weights/norm/layer_{index}")[0]
        assert (event.step, event.value) == (2, pytest.approx(row.norm().item()))
    assert "layer_weights/values" in tags["histograms"]
    histogram = acc.Histograms("layer_weights/values")[0].histogram_value
    assert (histogram.min, histogram.max, histogram.num) == (0.0, 11.0, 12)
    assert {"layer_weights/norms", "layer_weights/heatmap"} <= set(tags["images"])
    heatmap = acc.Images("layer_weights/heatmap")[0]
    assert (heatmap.step, heatmap.width, heatmap.height) == (2, 4, 3 * 4)  # 3 layers x 4 pixel rows
    assert acc.Images("layer_weights/norms")[0].encoded_image_string[:4] == b"\x89PNG"
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 3" in text and "temperature: 0.05" in text

    progress = capsys.readouterr().err
    assert "3/3" in progress and "loss=1.5" in progress and "step/s" in progress


def test_layer_norm_vector_and_shape_check(tmp_path):
    recipe = recipe_from_dict({"logging": {"progress_bar": False}})
    with Monitor(tmp_path, recipe, total_steps=1, enabled=True) as monitor:
        monitor.log_layer_weights(5, torch.tensor([1.0, 3.0]), [7, 8])
        with pytest.raises(ValueError, match="K = 3"):
            monitor.log_layer_weights(5, torch.ones(2, 4), [1, 2, 3])
    acc = read_events(tmp_path / "tensorboard")
    assert acc.Scalars("layer_weights/norm/layer_8")[0].value == 3.0
    assert "layer_weights/heatmap" not in acc.Tags()["images"]  # only for a [K, D] matrix


def test_non_main_rank_and_disabled_outputs_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monitor = Monitor(tmp_path / "r1", recipe_from_dict({}), total_steps=5)  # enabled defaults to is_main()
    monitor.log_scalars(1, {"train/loss": 1.0})
    monitor.log_layer_weights(1, torch.ones(2, 2), [1, 2])
    monitor.log_recipe("x: 1")
    monitor.write("hello")
    monitor.close()
    assert not (tmp_path / "r1").exists()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    quiet = recipe_from_dict({"logging": {"tensorboard": False, "progress_bar": False}})
    with Monitor(tmp_path / "r0", quiet, total_steps=5) as monitor:
        monitor.log_scalars(1, {"train/loss": 1.0})
    assert not (tmp_path / "r0" / "tensorboard").exists()


def test_change_from_the_initial_layer_weights_per_row(tmp_path):
    from dsembed.training.monitor import relative_change

    initial = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])  # row norms 5, 0, 1
    weights = torch.tensor([[3.0, 5.0], [0.0, 2.0], [1.0, 0.0]])
    rows, whole = relative_change(weights, initial)
    assert rows[0].item() == pytest.approx(0.2) and rows[2].item() == 0.0
    assert torch.isnan(rows[1])  # a row that started at zero has no relative change
    assert whole == pytest.approx((1.0 + 4.0) ** 0.5 / (25.0 + 1.0) ** 0.5)
    assert relative_change(weights, torch.zeros(3, 2))[1] is None  # layer_weights_init: zeros

    with Monitor(tmp_path, recipe_from_dict({}), total_steps=1, enabled=True) as monitor:
        monitor.log_layer_weights(1, weights, [5, 6, 7], change=rows)
        with pytest.raises(ValueError, match=r"change \(2,\) should be \[K\] with K = 3"):
            monitor.log_layer_weights(1, weights, [5, 6, 7], change=rows[:2])
    acc = read_events(tmp_path / "tensorboard")
    assert acc.Scalars("layer_weights/change/layer_5")[0].value == pytest.approx(0.2)
    assert acc.Scalars("layer_weights/change/layer_7")[0].value == 0.0
    assert "layer_weights/change/layer_6" not in acc.Tags()["scalars"]
