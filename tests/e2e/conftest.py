"""The shared end-to-end stack: one local Ray and Serve deployment for every e2e module that asks for it.

Starting Ray, the gateway and a vLLM engine costs one to three minutes on two cores, so e2e modules share
one ``SharedStack`` (``tests/support/stack.py``) instead of each starting their own:

- ``arks_stack`` (module scope): the stack, up. Its base is the demo manifest (app and endpoint ``tiny``,
  the demo token ``arks_stack.token``), two gateway replicas counting in ``arks_stack.redis``, gateway
  settings ``SharedStack.BASE_SETTINGS``; ``arks_stack.url`` is the gateway (``/v1/...`` below it).
- A module adds its own objects with a module-scoped fixture, and leaves the base behind::

      @pytest.fixture(scope="module")
      def stack(arks_stack: SharedStack) -> Iterator[SharedStack]:
          with arks_stack.extended(MY_OBJECTS, settings={...}, label="my module"):
              yield arks_stack

  ``arks_stack.apply(objects, settings)`` changes the running config inside the module (tokens
  added or removed, apps left out); objects replace base objects of the same kind and name. Apps whose
  pods need a worker group the running Ray lacks get one more local raylet.
- ``no_shared_stack``: for a module that runs a Ray of its own (the multi-node cluster); it stops the
  shared stack first, and the next module that asks for ``arks_stack`` brings it up again.

Ordering: within the e2e tests, modules that do not use the shared stack run first, then those that do,
so it comes up once; it is stopped as soon as the next test no longer needs it (the integration and unit
tests that follow run without it). Anything that starts Ray must run under the machine's Ray lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import SharedStack

HERE = Path(__file__).resolve().parent
STACK_KEY = pytest.StashKey[SharedStack]()
USERS_KEY = pytest.StashKey[set[str]]()


def _module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def _in_e2e(item: pytest.Item) -> bool:
    return HERE in Path(item.path).resolve().parents


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Shared-stack modules after the other e2e modules (stable otherwise); remember which modules use it."""
    users = {_module_of(i) for i in items if _in_e2e(i) and "arks_stack" in getattr(i, "fixturenames", ())}
    session.stash[USERS_KEY] = users
    slots = [n for n, item in enumerate(items) if _in_e2e(item)]
    ordered = sorted((items[n] for n in slots), key=lambda i: _module_of(i) in users)
    for n, item in zip(slots, ordered, strict=True):
        items[n] = item


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After the last test of the last module that uses the shared stack, stop it."""
    try:
        return (yield)
    finally:
        stack = item.session.stash.get(STACK_KEY, None)
        users = item.session.stash.get(USERS_KEY, set())
        if stack is not None and stack.is_up and (nextitem is None or _module_of(nextitem) not in users):
            stack.down()


@pytest.fixture(scope="session")
def _shared_stack(request: pytest.FixtureRequest) -> Iterator[SharedStack]:
    stack = SharedStack()
    request.session.stash[STACK_KEY] = stack
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def arks_stack(_shared_stack: SharedStack) -> SharedStack:
    """The shared stack, up (see the module docstring for what it holds and how to extend it)."""
    return _shared_stack.up()


@pytest.fixture(scope="module")
def no_shared_stack(request: pytest.FixtureRequest) -> None:
    """Stop the shared stack, for a module that starts a Ray of its own."""
    stack = request.session.stash.get(STACK_KEY, None)
    if stack is not None:
        stack.down()
