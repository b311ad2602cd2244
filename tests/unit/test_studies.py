"""The studies' settings (studies.py). A whole offline study through the CLI: tests/integration/test_studies.py."""
from __future__ import annotations

import pytest

from qlora_lab import studies
from qlora_lab.errors import UserError

from .conftest import CONFIGS


def test_offline_runs_each_config_as_a_random_weight_model_of_its_shape():
    assert studies.offline_overrides(CONFIGS / "falcon7b_oasst1_qlora.yaml")[:2] == [
        "model.name_or_path=null", "model.random_init=falcon-7b"]
    assert "model.random_init=llama2-7b" in studies.offline_overrides(CONFIGS / "llama2_7b_lima_lora.yaml")
    with pytest.raises(UserError, match="unknown study"):
        studies.spec("gpt2_wikitext")
