"""The tradeoff suites, as functions that return a :class:`~agxguard.report.Report`.

    from agxguard.suites import complete_story, comprehensive
    report = complete_story(device="cpu", mode="all")   # repr: the tradeoff table
    report.to_json("story.json")

Each mode runs in turn; every run happens in a child process (see agxguard.harness),
so a crash is recorded as what it was and never takes the other results with it.
"""
from .common import MODES, OptionError
from .story import complete_story
from .comprehensive import comprehensive

__all__ = ["complete_story", "comprehensive", "MODES", "OptionError"]
