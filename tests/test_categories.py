"""The seven categories, their aliases (CoProV2's and I2P's spellings) and multi-category parsing."""

import pytest

from safetydpo_core.categories import (ALIASES, CATEGORIES, COPROV2_NAMES, I2P_NAMES, coprov2_name, describe_categories,
                                       i2p_name, normalize_categories, normalize_category)
from safetydpo_core.errors import ConfigError, SafetyDPOError


def test_seven_canonical_ids():
    assert CATEGORIES == ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")
    for c in CATEGORIES:
        assert normalize_category(c) == c
        assert normalize_category(c.upper()) == c


@pytest.mark.parametrize("name,canon", [
    ("Hate", "hate"), ("Harrasment", "harassment"), ("Violence", "violence"), ("self-harm", "self_harm"),
    ("sexual", "sexual"), ("Shocking", "shocking"), ("Illegal Activity", "illegal_activity"),
    ("illegal activity", "illegal_activity"), ("harassment", "harassment"), ("Self Harm", "self_harm"),
    ("SELF_HARM", "self_harm"), ("  Illegal   Activity ", "illegal_activity"), ("illegal-activity", "illegal_activity"),
    ("nudity", "sexual"), ("gore", "shocking"), ("selfharm", "self_harm"),
])
def test_spellings_in_the_wild(name, canon):
    assert normalize_category(name) == canon


def test_export_spellings_round_trip():
    assert set(COPROV2_NAMES) == set(CATEGORIES) == set(I2P_NAMES)
    for c in CATEGORIES:
        assert normalize_category(coprov2_name(c)) == c
        assert normalize_category(i2p_name(c)) == c
    assert coprov2_name("harassment") == "Harrasment"  # CoProV2's own typo, kept for export
    assert i2p_name("self_harm") == "self-harm" and i2p_name("illegal_activity") == "illegal activity"


def test_every_alias_maps_to_a_canonical_id():
    for alias, canon in ALIASES.items():
        assert canon in CATEGORIES
        assert normalize_category(alias) == canon


def test_multi_category_strings_and_lists():
    # I2P writes several categories comma-separated
    assert normalize_categories("hate, harassment, violence") == ["hate", "harassment", "violence"]
    assert normalize_categories(["Harrasment", "harassment", "self-harm"]) == ["harassment", "self_harm"]
    assert normalize_categories("sexual,shocking,illegal activity") == ["sexual", "shocking", "illegal_activity"]
    assert normalize_categories("all") == list(CATEGORIES)
    assert normalize_categories(None) == [] and normalize_categories(None, default_all=True) == list(CATEGORIES)
    assert normalize_categories("") == []
    with pytest.raises(ConfigError):
        normalize_categories("all", allow_all=False)


def test_unknown_category_lists_valid_names_and_aliases():
    with pytest.raises(SafetyDPOError) as e:
        normalize_category("weapons")
    msg = str(e.value)
    assert "'weapons'" in msg
    for c in CATEGORIES:
        assert c in msg
    assert "Harrasment".lower() in msg.lower() and "illegal activity" in msg
    assert describe_categories() in msg
    with pytest.raises(ConfigError, match="bogus"):
        normalize_categories("hate, bogus")
