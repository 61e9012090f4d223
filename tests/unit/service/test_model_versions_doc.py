"""Every model_versions field the API documents says what it counts: the slice's whole life.

The counts are kept per slice since it was made, not per count bucket, so an incident's root
slice shows e.g. 720 events of v1 where 313 arrived since the onset; a reader of the schema must
not take them for the since-onset counts beside them."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from driftline.alerts.model import Evidence, SliceEvidence
from driftline.service.schemas.incidents import SliceEffect
from driftline.service.schemas.slices import SliceDetail


@pytest.mark.parametrize("model", [Evidence, SliceEvidence, SliceEffect, SliceDetail])
def test_model_versions_are_described_as_lifetime_counts(model: type[BaseModel]) -> None:
    prop = model.model_json_schema()["properties"]["model_versions"]
    assert "whole life" in prop.get("description", ""), model.__name__
