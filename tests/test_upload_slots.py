"""The per-address upload limit shared by the model and series uploads."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from medverse.server.httpauth import UploadSlots


def _request(addr: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.return_value = (addr, 50000)
    return make_mocked_request("POST", "/rooms/r/assets", transport=transport)


def test_two_uploads_per_address_then_rate_limited() -> None:
    slots = UploadSlots()
    a = _request("127.0.0.1")
    first, second = slots.take(a), slots.take(a)
    assert first == second == "127.0.0.1"
    with pytest.raises(web.HTTPException) as refused:
        slots.take(a)
    assert refused.value.status == 429
    assert json.loads(refused.value.text or "")["error"]["code"] == "rate_limited"
    assert slots.take(_request("127.0.0.2")) == "127.0.0.2"  # other addresses are not held up
    slots.give(first)
    assert slots.take(a) == "127.0.0.1"  # a slot given back is free again


def test_giving_back_every_slot_forgets_the_address() -> None:
    slots = UploadSlots()
    addr = slots.take(_request("127.0.0.1"))
    slots.give(addr)
    slots.give(addr)  # more than taken: never negative, never a lasting entry
    assert slots._busy == {}
    slots.take(_request("127.0.0.1"))
    slots.take(_request("127.0.0.1"))
