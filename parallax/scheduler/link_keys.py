"""Stage-link keys: one random key per pipeline, handed to its nodes in heartbeat answers.

A pipeline's key belongs to its composition (the ordered stages: node ids, layer ranges,
activation endpoints). It is made when a node of that composition first heartbeats and
forgotten when the composition leaves the allocation, so a pipeline that changes, or forms
again later, gets a fresh key, and a scheduler restart changes every key. Nodes sign and check
every stage message with it (parallax/node/link_auth.py). A node counts as loaded only once
its heartbeat reports (by fingerprint) that its executor holds the current key, so no request
is routed through a stage that would drop its peers' messages. Only joined nodes heartbeat, so
only they ever get a key; a whole-model pipeline (one stage) has no stage links and no key.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from parallax.node.link_auth import KEY_BYTES
from parallax.node.link_crypto import link_fingerprint
from parallax.scheduler.registry import Registry

Composition = tuple[tuple[str, int, int, str], ...]  # (node_id, start, end, endpoint) per stage


@dataclass(frozen=True)
class LinkGrant:
    """What a heartbeat answer tells a node about its stage links."""

    key: str = ""  # hex; "" when the node is in no pipeline of two or more stages
    key_id: str = ""  # link_crypto.link_fingerprint of the key and the CURVE keys
    peers: list[str] = field(default_factory=list)  # the pipeline's activation endpoints
    curve_keys: list[str] = field(default_factory=list)  # their CURVE keys ("": plain)

    def held_by(self, reported_key_id: str) -> bool:
        """Whether a node reporting `reported_key_id` can take part in its pipeline."""
        return not self.key or reported_key_id == self.key_id


def compositions(registry: Registry) -> list[Composition]:
    """The current pipelines of two or more stages whose every node is registered."""
    found = []
    for pipeline in registry.allocation.pipelines if registry.allocation else ():
        records = [registry.nodes.get(stage.node_id) for stage in pipeline]
        if len(pipeline) > 1 and all(r is not None for r in records):
            found.append(tuple((s.node_id, s.start_layer, s.end_layer, r.activation_endpoint)
                               for s, r in zip(pipeline, records, strict=True)))
    return found


class LinkKeys:
    """The key of every current pipeline (pure: no I/O; randomness injectable for tests)."""

    def __init__(self, random_key: Callable[[], bytes] | None = None) -> None:
        self._random = random_key or (lambda: secrets.token_bytes(KEY_BYTES))
        self._keys: dict[Composition, bytes] = {}

    def grant(self, registry: Registry, node_id: str) -> LinkGrant:
        """The key and endpoints of `node_id`'s pipeline (empty when it has none)."""
        current = compositions(registry)
        # keys of pipelines that are gone are forgotten: if one forms again, it gets a new key
        keys = {c: k for c, k in self._keys.items() if c in current}
        grant = LinkGrant()
        for composition in current:
            if any(stage[0] == node_id for stage in composition):
                key = keys.get(composition) or self._random()
                keys[composition] = key
                curve = [registry.nodes[stage[0]].curve_public_key for stage in composition]
                grant = LinkGrant(key.hex(), link_fingerprint(key, curve),
                                  [stage[3] for stage in composition], curve)
        self._keys = keys  # replaced whole: relay threads read a consistent snapshot
        return grant

    def key_of(self, node_id: str) -> bytes | None:
        """The key handed out for `node_id`'s pipeline, if one was (never makes one)."""
        for composition, key in list(self._keys.items()):
            if any(stage[0] == node_id for stage in composition):
                return key
        return None


def relay_keys(keys: LinkKeys, registry: Registry, peer_id: str) -> list[bytes] | None:
    """The keys a message relayed to the P2P peer `peer_id` may be sealed with ([] when its
    node is in no multi-stage pipeline); None when no joined node has that peer id."""
    for node_id, record in list(registry.nodes.items()):
        if record.peer_id == peer_id:
            key = keys.key_of(node_id)
            return [key] if key is not None else []
    return None
