"""docs/policy-api.md agrees with the proto: its JSON examples parse, every message is named."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import json_format

from milter_bridge.v1 import policy_pb2 as pb

DOC = Path(__file__).resolve().parent.parent / "docs" / "policy-api.md"


def test_every_json_example_is_the_message_it_names() -> None:
    examples = re.findall(r"```json (\w+)\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(examples) >= 8
    for name, text in examples:
        message = getattr(pb, name)()
        json_format.Parse(text, message)  # raises on an unknown field or a wrong value


def test_every_message_of_the_proto_is_in_the_document() -> None:
    text = DOC.read_text()
    missing = [name for name in pb.DESCRIPTOR.message_types_by_name if f"`{name}`" not in text]
    assert missing == []
