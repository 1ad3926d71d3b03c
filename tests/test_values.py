from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dckpt._errors import UnsafeCheckpointError, UnsupportedStateError
from dckpt._values import decode_value, encode_value

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.dictionaries(st.integers(), inner, max_size=3)
    ),
    max_leaves=20,
)


@given(values)
def test_values_round_trip_through_json(v: object) -> None:
    import json

    data = json.loads(json.dumps(encode_value(v, "k")))
    assert decode_value(data, "k") == v


def test_non_finite_floats_and_dtypes() -> None:
    out = decode_value(
        encode_value([float("inf"), float("-inf"), float("nan"), torch.bfloat16], "k"), "k"
    )
    assert out[:2] == [math.inf, -math.inf]
    assert math.isnan(out[2])  # type: ignore[index]
    assert out[3] is torch.bfloat16  # type: ignore[index]


def test_a_dict_using_the_tag_key_is_escaped() -> None:
    v = {"__dckpt__": "pickle", "b64": "x"}
    assert decode_value(encode_value(v, "k"), "k") == v


class Custom:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom)


def test_arbitrary_objects_need_pickle_on_both_sides() -> None:
    with pytest.raises(UnsupportedStateError, match="'k'.*allow_pickle"):
        encode_value(Custom(), "k")
    data = encode_value(Custom(), "k", allow_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match="'k'"):
        decode_value(data, "k")
    assert decode_value(data, "k", allow_pickle=True) == Custom()


def test_unknown_tag_is_corruption() -> None:
    from dckpt._errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="'k'"):
        decode_value({"__dckpt__": "exec", "code": "1"}, "k")
