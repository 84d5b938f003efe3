import pytest

from infd.config import ConfigError, from_mapping, to_mapping
from infd.models import AutoencoderConfig


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"renderer\.hiden"):
        from_mapping(AutoencoderConfig, {"renderer": {"hiden": 64}})


def test_bad_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"bottleneck\.kind.*'vq', 'kl', 'none'"):
        from_mapping(AutoencoderConfig, {"bottleneck": {"kind": "vqgan"}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'net\.ch' must be int"):
        from_mapping(AutoencoderConfig, {"net": {"ch": "128"}})


def test_group_norm_width_rule_is_explained():
    with pytest.raises(ConfigError, match=r"renderer\.hidden.*norm=pixel"):
        from_mapping(AutoencoderConfig, {"renderer": {"hidden": 48, "norm": "group"}})


def test_round_trip_through_plain_mapping():
    cfg = from_mapping(AutoencoderConfig, {"net": {"ch_mult": [1, 2]}, "renderer": {"kind": "liif"}})
    assert from_mapping(AutoencoderConfig, to_mapping(cfg)) == cfg


def test_optional_fields_written_with_a_bar_are_type_checked():
    from infd.data.transforms import PatchConfig

    assert from_mapping(PatchConfig, {"p_keep_late": None}).p_keep_late is None
    assert from_mapping(PatchConfig, {"p_keep_late": 1}).p_keep_late == 1.0
    with pytest.raises(ConfigError, match=r"p_keep_late' must be float"):
        from_mapping(PatchConfig, {"p_keep_late": "half"})
