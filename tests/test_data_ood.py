"""Out-of-domain text (data/ood.py): present on any install, described by its provenance, in no split."""

import pytest

from readme_jax.data import load_split
from readme_jax.data.ood import OOD_SETS, ood_text
from readme_jax.errors import DataError


@pytest.mark.parametrize("name", OOD_SETS)
def test_ood_sets_are_there_with_provenance(name):
    text, prov = ood_text(name)
    assert len(text) > 20_000 and prov["chars"] == len(text) and len(prov["sha256"]) == 64
    assert prov["packages"] and prov["files"]
    assert ood_text(name) == (text, prov)  # deterministic
    if name == "ood_code":
        assert "def " in text and "jinja2" in prov["packages"]
    else:
        assert "license" in text.lower()


def test_ood_code_is_not_the_code_domain(cache_dir):
    """Jinja2's source is third-party: no standard-library file of the code domain holds it."""
    text, _ = ood_text("ood_code")
    probe = text[text.index("def "):][:200]
    assert all(probe not in d.text for d in load_split("code", "train", cache_dir, progress=False))


def test_unknown_set():
    with pytest.raises(DataError, match="unknown out-of-domain set"):
        ood_text("news")
