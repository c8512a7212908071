"""DeepEP's ``deep_ep.utils`` names: ``EventOverlap`` and ``EventHandle``."""

from epcomm.event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
