"""Protocol decoders: byte streams of one connection → request/response exchanges."""

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

__all__ = ["Chunk", "Decoder", "Direction", "Exchange", "Undecodable"]
