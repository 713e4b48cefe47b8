"""Settings of the request path's speed: refused when out of range, with the variable's name."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


@pytest.mark.parametrize("value", [0.0, 1000.0])
def test_a_gil_switch_interval_out_of_range_is_refused(value):
    with pytest.raises(ValidationError, match="GIL_SWITCH_MS"):
        Settings(gil_switch_ms=value)


def test_inline_tagging_can_be_turned_off():
    assert Settings(inline_max_chars=0).inline_max_chars == 0
    with pytest.raises(ValidationError, match="INLINE_MAX_CHARS"):
        Settings(inline_max_chars=-1)
