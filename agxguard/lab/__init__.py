"""agxguard.lab: what measures agxguard, kept apart from what a user's process loads.

The tradeoff suites (``story``, ``comprehensive``) and their reports, the shared torch
workloads, and the Python side of the driver model (:mod:`agxguard.lab.model`). The
product (``import agxguard``) never imports this package; the lab imports the product.

    from agxguard.lab import story, comprehensive
    report = story(device="cpu", mode="all")   # repr: the tradeoff table
    report.to_json("story.json")

``python -m agxguard.lab story|comprehensive [options]`` runs them from the shell.
"""
from .suites.common import OptionError
from .suites.comprehensive import comprehensive
from .suites.story import story

__all__ = ["story", "comprehensive", "OptionError"]
