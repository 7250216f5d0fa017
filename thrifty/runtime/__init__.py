"""Runtime: `Session`, one conversation's KV state over an `HFDecoder`."""

from thrifty.runtime.session import DecodeResult, ExtendResult, Session

__all__ = ["Session", "ExtendResult", "DecodeResult"]
