"""P2P mode: scheduler and nodes reach each other through Lattica (libp2p) peers.

`peer.py` builds a peer, `bridge.py` carries HTTP over Lattica streams, `safety.py` closes
Lattica's pickle hole in this process, `relay.py` carries activations between nodes that cannot
reach each other directly.
"""
