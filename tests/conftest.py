"""Test order: the end-to-end runs first, then the multi-process tests, then the unit tests.

Same tests, another order: under pytest-xdist (``make test``) a worker that is free takes the next
file, so the long files start early and the many short unit files fill the end, instead of one
long file running alone after everything else has finished. Tests do not depend on their order.
"""

_FIRST_TO_LAST = ("tests/integration/", "tests/distributed/", "tests/unit/")


def _rank(item) -> int:
    path = item.nodeid
    return next((i for i, prefix in enumerate(_FIRST_TO_LAST) if path.startswith(prefix)), len(_FIRST_TO_LAST))


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)  # stable: each directory keeps its own order
