"""Which pipeline served each recent conversation, for cache-aware routing (routing.py).

A bounded LRU map from a conversation key (routing.conversation_keys of a request's whole
message list) to the node ids of the pipeline it was placed on. The next turn's messages
extend that list, so the longest of its own keys found here names the pipeline whose prefix
caches hold its history. Pipelines are remembered by node ids, not index, so a rebalance that
changes the pipelines simply finds no match.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

MAX_CONVERSATIONS = 4096


class PrefixAffinity:
    """Bounded LRU: conversation key -> node ids of the pipeline that served it."""

    def __init__(self, max_entries: int = MAX_CONVERSATIONS) -> None:
        self.max_entries = max_entries
        self._pipelines: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pipelines)

    def remember(self, keys: Sequence[str], node_ids: tuple[str, ...]) -> None:
        """The request whose conversation keys are `keys` went to the pipeline `node_ids`."""
        if not keys:
            return
        self._pipelines[keys[-1]] = node_ids
        self._pipelines.move_to_end(keys[-1])
        while len(self._pipelines) > self.max_entries:
            self._pipelines.popitem(last=False)

    def preferred(self, keys: Sequence[str],
                  pipelines: Sequence[Sequence[str]]) -> int | None:
        """Index in `pipelines` (each a sequence of node ids) of the pipeline that served the
        longest remembered leading part of this conversation, shorter than the whole (a next
        turn always adds messages; the same messages again, e.g. identical requests sent
        together, are spread as usual); None when none is known."""
        for key in reversed(keys[:-1]):
            node_ids = self._pipelines.get(key)
            if node_ids is None:
                continue
            self._pipelines.move_to_end(key)
            for index, pipeline in enumerate(pipelines):
                if tuple(pipeline) == node_ids:
                    return index
            return None
        return None
