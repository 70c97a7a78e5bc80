"""Talking to running sites and brokers, and the one test-only switch the site server accepts."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from gateway import _mechanisms as mechanisms
from gateway.broker import RunningBroker
from gateway.client import Client
from gateway.proof import ProofKey
from gateway.site import RunningSite

T = TypeVar("T")


class ExactNoise(mechanisms.Noise):
    """TEST ONLY: releases exact aggregates, to check SQL results. Never reachable from policy or CLI.

    It reaches a server only through the ``noise`` keyword of ``build_site_server`` (the
    ``start_site`` fixture's ``noise=ExactNoise()``).
    """

    mechanism = selection_mechanism = "exact(test-only)"

    def apply(self, component: mechanisms.Component, exact: tuple[int, ...]) -> list[int]:
        return list(exact)

    def select(self, component: mechanisms.Component, exact: tuple[int, ...]) -> list[int]:
        """The best-scored edge of each group (the first, on a tie)."""
        return [min(range(len(scores)), key=scores.__getitem__) for scores in component.scores(exact)]


def signed(request: T, token: str, sites: Sequence[str] = ("",), key: ProofKey | None = None) -> T:
    """``request`` with a proof of possession per site in ``sites``, signed by ``key`` (default: the
    test session's proof key, which the ``token`` fixture binds tokens to)."""
    (key or ProofKey.load(Path(os.environ["GATEWAY_PROOF_KEY"]))).attach(request, token, list(sites))
    return request


def client(server: RunningSite | RunningBroker, token: Callable[..., str], **claims: str) -> Client:
    """A client of ``server`` without retries, holding ``token(**claims)`` (project, role, subject), that
    knows whom to sign its proofs for (so its first call is no handshake)."""
    names = ([s.name for s in server.service.config.sites] if isinstance(server, RunningBroker)
             else [server.state.live.loaded.policy.site])
    return Client(server.target, token=token(**claims), retries=0, sign_for=names)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
