"""Test-run options: ``TEXTRL_TEST_FIRST`` (space-separated paths or node-id prefixes) runs those tests first,
the others after in their usual order — the GPU check puts the decoder tests first, so a run cut short by its
time limit has run them."""

import os


def pytest_collection_modifyitems(config, items):
    first = os.environ.get("TEXTRL_TEST_FIRST", "").split()
    if first:
        rank = lambda item: next((i for i, p in enumerate(first) if item.nodeid.startswith(p)), len(first))  # noqa: E731
        items.sort(key=rank)  # (stable: the rest keep their order)
