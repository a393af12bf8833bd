"""The parity engine, split by concern:

* ``tolerances``: one policy per precision, each bound with its reason;
* ``cases``: the case families (real held-out texts, padding, generated ids);
* ``compare``: run a case, compute metrics, turn them into checks;
* ``verification``: the artifact x runtime x case loop and the verdict;
* ``report``: the result object, the terminal table, parity.md/.json and the plot.
"""
from .report import Report, terminal_summary, write_report  # noqa: F401
from .verification import verify  # noqa: F401
