"""/tag builds its answer with ``schemas.text_result_json`` (no pydantic on the hot path); the
documented shape is ``schemas.TextResultOut``. The two must say the same thing."""
from __future__ import annotations

import uuid

import pytest

from ml.pipeline import Entity, TextResult, TokenTag
from service.schemas import EntityOut, ModelRef, TextResultOut, TokenOut, entities_json, text_result_json

RESULT = TextResult(
    entities=[Entity(0, 5, "PER", "Alice", 0.9876543219)],
    tokens=[TokenTag("Alice", 0, 5, "B-PER", 0.9876543219), TokenTag("sings", 6, 11, "O", 0.5)],
    sentences=1,
)


@pytest.mark.parametrize("stored", [True, False])
@pytest.mark.parametrize("with_tokens", [True, False])
def test_the_built_json_is_exactly_the_documented_shape(stored, with_tokens):
    prediction_id = uuid.uuid4() if stored else None
    built = text_result_json(prediction_id, "en-conll03", "1.0.0", entities_json(RESULT), RESULT if with_tokens else None)
    parsed = TextResultOut.model_validate(built)
    # every key the schema has (tokens only when asked for), and nothing it lacks
    expected_keys = set(TextResultOut.model_fields) - (set() if with_tokens else {"tokens"})
    assert set(built) == expected_keys
    assert set(built["model"]) == set(ModelRef.model_fields)
    assert all(set(e) == set(EntityOut.model_fields) for e in built["entities"])
    assert all(set(t) == set(TokenOut.model_fields) for t in built.get("tokens", []))
    # and the schema reads back what was built
    assert parsed.model_dump(mode="json", exclude_unset=True) == built
    assert built["stored"] is stored and (built["id"] == str(prediction_id) if stored else built["id"] is None)


def test_scores_are_rounded_to_six_places():
    built = text_result_json(None, "m", "1", entities_json(RESULT), RESULT)
    assert built["entities"][0]["score"] == 0.987654
    assert built["tokens"][0]["score"] == 0.987654
