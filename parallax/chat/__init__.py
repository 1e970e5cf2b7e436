"""`parallax chat`: the web chat UI on a machine that is not a node, proxying to the scheduler."""

from parallax.chat.server import build_chat_app, run_chat

__all__ = ["build_chat_app", "run_chat"]
