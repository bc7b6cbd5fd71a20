"""Deployment files shipped with edgepipe (``systemd/edgerun-agent.service``); data only."""
