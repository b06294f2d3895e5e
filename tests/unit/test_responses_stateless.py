"""The Responses API through the gateway is stateless: what needs stored state is refused with an OpenAI
400 naming the field, and its usage (input/output tokens) is metered like chat usage."""

from __future__ import annotations

from typing import Any

import pytest

from arks_ray.errors import InvalidRequest
from arks_ray.gateway.limits import Usage, usage_from
from arks_ray.gateway.requests import check_request


def check(body: dict[str, Any]) -> dict[str, Any]:
    return check_request("responses", {"model": "m", "input": "hi", **body}, max_n=8, max_prompts=64)


@pytest.mark.parametrize(("field", "value"), [("previous_response_id", "resp_1"), ("store", True),
                                              ("background", True), ("conversation", "conv_1")])
def test_stateful_fields_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as err:
        check({field: value})
    assert err.value.param == field
    assert "keeps no" in err.value.message


@pytest.mark.parametrize("body", [{}, {"store": False}, {"background": False}, {"previous_response_id": None}])
def test_stateless_requests_pass(body: dict[str, Any]) -> None:
    assert check(body)["input"] == "hi"


def test_other_endpoints_keep_their_fields() -> None:
    body = {"model": "m", "messages": [], "store": True}
    assert check_request("chat", body, max_n=8, max_prompts=64) is body


def test_responses_usage_is_metered() -> None:
    assert usage_from({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}, 1, 1) == Usage(7, 3)
    assert usage_from({"prompt_tokens": 7, "completion_tokens": 3}, 1, 1) == Usage(7, 3)
