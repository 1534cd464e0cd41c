"""plotting: the data -> pixel map and where line_plot puts its points."""
import numpy as np
import pytest

from diffusion_jax import plotting


def test_to_pixels_maps_box_corners_and_centre():
    size, pad = (300, 200), 20
    px, py = plotting.to_pixels([0.0, 10.0, 5.0], [-1.0, 1.0, 0.0], (0.0, 10.0), (-1.0, 1.0),
                                size, pad)
    np.testing.assert_allclose(px, [20.0, 280.0, 150.0])
    np.testing.assert_allclose(py, [180.0, 20.0, 100.0])  # y grows upwards


def test_to_pixels_rejects_empty_range_and_tiny_box():
    with pytest.raises(ValueError, match="lo < hi"):
        plotting.to_pixels(0, 0, (1.0, 1.0), (0.0, 1.0), (100, 100), 10)
    with pytest.raises(ValueError, match="no room"):
        plotting.to_pixels(0, 0, (0.0, 1.0), (0.0, 1.0), (100, 100), 50)


def test_line_plot_draws_points_where_to_pixels_says():
    xs, ys = [1.0, 2.0, 4.0], [10.0, 30.0, 20.0]
    size, pad, margin = (400, 300), 50, 0.1
    img = np.asarray(plotting.line_plot({"a": (xs, ys, [])}, title="t", x_label="x",
                                        y_label="y", size=size, pad=pad, margin=margin))
    x_range = (1.0 - 0.1 * 3.0, 4.0 + 0.1 * 3.0)     # limits widened by margin * span
    y_range = (10.0 - 0.1 * 20.0, 30.0 + 0.1 * 20.0)
    px, py = plotting.to_pixels(xs, ys, x_range, y_range, size, pad)
    color = np.array(plotting.COLORS[0])
    for x, y in zip(px, py):
        np.testing.assert_array_equal(img[int(round(y)), int(round(x))], color)
    # A spot inside the box far from the line and the legend stays white.
    np.testing.assert_array_equal(img[int(py[0]) - 60, int(px[2]) - 10], [255, 255, 255])


def test_line_plot_reference_lines_widen_the_limits():
    # A horizontal reference line far above the points must still fall inside the box.
    img = np.asarray(plotting.line_plot({"a": ([0.0, 1.0], [0.0, 1.0], ["p", "q"])},
                                        title="t", x_label="x", y_label="y", size=(200, 200),
                                        pad=20, h_lines={"ref": 9.0}, margin=0.1))
    _, py = plotting.to_pixels(0.0, 9.0, (-0.1, 1.1), (-0.9, 9.9), (200, 200), 20)
    row = img[int(round(float(py)))]
    gray = np.all(row == np.array(plotting.REFERENCE_COLOR), axis=1)
    assert gray.sum() > 20  # the dashes of the reference line lie on that row


def test_line_plot_rejects_mismatched_series():
    with pytest.raises(ValueError, match="equal lengths"):
        plotting.line_plot({"a": ([0.0, 1.0], [0.0], [])}, title="t", x_label="x", y_label="y")
    with pytest.raises(ValueError, match="at least one point"):
        plotting.line_plot({"a": ([], [], [])}, title="t", x_label="x", y_label="y")
