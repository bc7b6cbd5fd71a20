"""Preprocessing resolution speaks in parameters; the convert command puts its own flag in front."""
from __future__ import annotations

import pytest

from edgepipe.device.cliout import fail
from edgepipe.pipeline.preprocessing import PRESETS, PreprocessError, PreprocessRequest, resolve


@pytest.mark.parametrize("request_, param", [
    (PreprocessRequest(preset="nope"), "preset"),
    (PreprocessRequest(mean=(1.0, 2.0)), "mean"),
    (PreprocessRequest(preset="raw", std=(0.0,)), "std"),
    (PreprocessRequest(resize="center-crop", crop_fraction=1.5), "crop_fraction"),
])
def test_errors_name_the_parameter_never_a_flag(request_, param):
    with pytest.raises(PreprocessError) as e:
        resolve((1, 8, 8, 3), request_)
    assert e.value.param == param
    assert "--" not in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_the_choices_and_convert_names_its_flag():
    from edgepipe.pipeline.cli_convert import convert

    with pytest.raises(PreprocessError) as e:
        resolve((1, 8, 8, 3), PreprocessRequest(preset="nope"))
    assert str(e.value) == f"unknown preprocessing preset 'nope'; choose from {', '.join(PRESETS)}"
    assert fail(e.value, command=convert).message == f"--preprocess: {e.value}"


def test_what_was_assumed_names_no_flag():
    spec = resolve((1, 8, 8, 3), PreprocessRequest())
    assert "no preprocessing preset given: pixels scaled to [0, 1] (preset 'unit')" in spec.assumed
    assert spec.preset is None and spec.std == (255.0, 255.0, 255.0)
    assert not any("--" in note for note in spec.assumed)
