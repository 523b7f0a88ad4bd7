"""``orsgen review``: human screening of a finished dataset in the browser.

``make_server`` builds the local review page (``server.py``, static files in
``static/``) over the samples of some splits (``samples.py``); every verdict
is saved at once to ``DIR/_review/decisions.parquet`` (``store.py``). A
later build applies the verdicts (``stages/screening.py``, ``review.decisions``).
"""

from orsgen.stages.dataset.review.samples import ReviewError, ReviewIndex, parse_shard
from orsgen.stages.dataset.review.server import ReviewServer, ReviewSession, make_server
from orsgen.stages.dataset.review.store import DecisionLog, ReviewStoreError, check_reviewer

__all__ = [
    "DecisionLog",
    "ReviewError",
    "ReviewIndex",
    "ReviewServer",
    "ReviewSession",
    "ReviewStoreError",
    "check_reviewer",
    "make_server",
    "parse_shard",
]
