"""Is the prefilter Envoy runs the one the live settings compile to?

`envoy-config` puts its plan's digest on the ext_proc stream's initial metadata
(`x-extproc-otel-prefilter`). Envoy's side is static while the rules file reloads
live: a rule that raises a ratio past what Envoy's matcher lets through cannot take
effect until Envoy's config is regenerated. `PrefilterWatch` compares each digest
Envoy sends with the live plan's, says so once in the log when they differ, and
shows both (`check-config`, the admin endpoint's `/config`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from loguru import logger

from ext_proc.policy.sampling.prefilter import PrefilterPlan

DIGEST_KEY = "x-extproc-otel-prefilter"


def digest_in_envoy_config(text: str) -> str | None:
    """The prefilter digest an Envoy config (any `envoy-config` format) carries, or None."""
    def find(node: Any) -> str | None:
        if isinstance(node, dict):
            if node.get("key") == DIGEST_KEY and isinstance(node.get("value"), str):
                return node["value"]
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                found = find(item)
                if found is not None:
                    return found
        return None
    for doc in yaml.safe_load_all(text):
        found = find(doc)
        if found is not None:
            return found
    return None


class PrefilterWatch:
    __slots__ = ("_envoy", "_live", "_warned")

    def __init__(self, live: Callable[[], PrefilterPlan]) -> None:
        self._live = live
        self._envoy: str | None = None  # the last digest Envoy sent; None: none yet
        self._warned: set[tuple[str, str]] = set()

    def observe(self, digest: str | None) -> None:
        """Called per ext_proc stream with the digest Envoy sent (None: none sent, which
        a stream cannot tell from an older config; "": known to have no prefilter).
        Cheap when nothing changed."""
        if digest is None or digest == self._envoy:
            return
        self._envoy = digest
        self.recheck()

    def recheck(self) -> None:
        """Compare again (after a rules reload) and warn once per (Envoy, live) pair."""
        envoy, plan = self._envoy, self._live()
        if envoy is None or not self.stale:
            return
        pair = (envoy, plan.digest())
        if pair not in self._warned:
            self._warned.add(pair)
            logger.warning(
                "Envoy's prefilter is stale: regenerate its config (extproc-otel envoy-config)",
                envoy_digest=envoy, live_digest=pair[1], live=plan.why)

    @property
    def envoy_digest(self) -> str | None:
        return self._envoy

    @property
    def stale(self) -> bool:
        plan = self._live()
        live = plan.digest() if plan.enabled else ""  # "": no prefilter, asks about all
        return self._envoy is not None and self._envoy != live

    def describe(self) -> dict[str, object]:
        return {**self._live().describe(), "envoy_digest": self._envoy, "stale": self.stale}
