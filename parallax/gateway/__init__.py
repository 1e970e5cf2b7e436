"""`parallax gateway`: a password-protected backend for a phone app, in front of the scheduler."""

from parallax.gateway.server import build_gateway_app, run_gateway

__all__ = ["build_gateway_app", "run_gateway"]
