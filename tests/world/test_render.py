import numpy as np
import pytest

from avr.world import PALETTE, Scene, SceneObject, degrade, render

SCENE = Scene(
    (
        SceneObject("circle", "red", 0.25, 0.3, 0.2),
        SceneObject("square", "blue", 0.7, 0.3, 0.18),
        SceneObject("triangle", "yellow", 0.5, 0.75, 0.2),
    )
)


def test_render_is_deterministic_and_sized():
    a, b = render(SCENE, 64), render(SCENE, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert render(SCENE, 32).size == (32, 32)


def test_render_paints_palette_colors_and_antialiases_edges():
    pixels = np.asarray(render(SCENE, 64)).reshape(-1, 3)
    colors = {tuple(p) for p in pixels}
    assert PALETTE["red"] in colors and PALETTE["blue"] in colors and (255, 255, 255) in colors
    # Edge pixels blend an object color with the white canvas: more than 4 distinct colors.
    assert len(colors) > 20


def test_square_fills_its_box_exactly_where_aligned():
    scene = Scene((SceneObject("square", "green", 0.5, 0.5, 0.25),))  # 16 px box from 24 to 40
    pixels = np.asarray(render(scene, 64))
    assert (pixels[24:40, 24:40] == PALETTE["green"]).all()
    assert (pixels[:24] == 255).all() and (pixels[40:] == 255).all()


def test_partial_and_edited_scenes_render_their_own_objects():
    full = np.asarray(render(SCENE))
    part = np.asarray(render(SCENE.subset([0])))
    assert not np.array_equal(full, part)
    assert np.array_equal(part, np.asarray(render(SCENE.remove(2).remove(1))))
    recolored = np.asarray(render(SCENE.recolor(0, "green")))
    assert (recolored.reshape(-1, 3) == PALETTE["green"]).all(-1).any()
    assert not (recolored.reshape(-1, 3) == PALETTE["red"]).all(-1).any()


def test_degrade_is_deterministic_given_seed():
    image = render(SCENE)
    assert np.array_equal(np.asarray(degrade(image, seed=3)), np.asarray(degrade(image, seed=3)))
    assert not np.array_equal(
        np.asarray(degrade(image, seed=3)), np.asarray(degrade(image, seed=4))
    )


def test_bad_scene_input_is_rejected():
    with pytest.raises(ValueError, match="shape 'hexagon' is not one of circle, square, triangle"):
        SceneObject("hexagon", "red", 0.5, 0.5, 0.2)
    with pytest.raises(ValueError, match="color 'pink' is not one of"):
        SceneObject("circle", "pink", 0.5, 0.5, 0.2)
    with pytest.raises(IndexError, match="object index 5 out of range for a scene of 3 objects"):
        SCENE.recolor(5, "red")
    with pytest.raises(ValueError, match="resolution must be at least 8 px"):
        render(SCENE, 4)


def test_scene_json_round_trip():
    assert Scene.from_json(SCENE.to_json()) == SCENE
