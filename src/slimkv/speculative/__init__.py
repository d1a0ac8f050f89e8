"""Lossless decoding: draft cheaply (compressed cache, prompt lookup, REST), verify against the full cache.

Modules: ``dual`` (the draft and full views), ``drafters`` (the drafter interface and drafters),
``verify`` (greedy acceptance and speculative sampling), ``datastore`` (REST's token index),
``loop`` (the decode loop ``Engine.stream`` runs when ``GenerationConfig.lossless`` is set).
"""

from .drafters import AutoDrafter, Draft, Drafter, PromptLookupDrafter, RestDrafter, SelfDrafter, make_drafter
from .dual import DiskFullView, DualCache, FullView, FullViewUnavailable, MemoryFullView
from .verify import Verdict, accept_greedy, accept_sampled

__all__ = [
    "AutoDrafter", "DiskFullView", "Draft", "Drafter", "DualCache", "FullView", "FullViewUnavailable",
    "MemoryFullView", "PromptLookupDrafter", "RestDrafter", "SelfDrafter", "Verdict", "accept_greedy",
    "accept_sampled", "make_drafter",
]
