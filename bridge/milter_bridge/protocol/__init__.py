"""The milter protocol without I/O: constants, typed commands and replies, framing.

Imports neither asyncio nor grpc (tests/test_layering.py checks it).
"""

from milter_bridge.protocol.codec import (
    DEFAULT_MAX_PACKET_SIZE,
    CommandDecoder,
    Frame,
    FrameDecoder,
    ReplyDecoder,
    decode_command,
    decode_reply,
    encode,
    encode_all,
)
from milter_bridge.protocol.errors import (
    FrameTooLarge,
    InvalidAnswer,
    MalformedPacket,
    MilterError,
    ProtocolError,
    UnknownCommand,
)

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "CommandDecoder",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "InvalidAnswer",
    "MalformedPacket",
    "MilterError",
    "ProtocolError",
    "ReplyDecoder",
    "UnknownCommand",
    "decode_command",
    "decode_reply",
    "encode",
    "encode_all",
]
