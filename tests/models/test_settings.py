import ml_collections
import pytest

from jaxdet.models.settings import merge_settings

DEFAULTS = {"lr": 0.1, "backbone_kw": {"widths": (4, 8)},
            "loss": {"beta": 1.0, "weight": 2.0}}


def test_nested_sections_merge_key_by_key_and_opaque_keys_are_taken_whole():
  given = ml_collections.ConfigDict({"loss": {"beta": 0.5}, "backbone_kw": {"stride": 8}})
  out = merge_settings(DEFAULTS, given, "config.model")
  assert out == {"lr": 0.1, "backbone_kw": {"stride": 8}, "loss": {"beta": 0.5, "weight": 2.0}}
  assert merge_settings(DEFAULTS, None, "config.model") == DEFAULTS
  assert isinstance(out["loss"], dict) and DEFAULTS["loss"]["beta"] == 1.0   # defaults untouched


def test_unknown_keys_name_their_path():
  with pytest.raises(ValueError, match=r"config.model: unknown keys \['lr2'\]; expected some of"):
    merge_settings(DEFAULTS, {"lr2": 1}, "config.model")
  with pytest.raises(ValueError, match=r"config.model.loss: unknown keys \['bta'\]"):
    merge_settings(DEFAULTS, {"loss": {"bta": 1}}, "config.model")
