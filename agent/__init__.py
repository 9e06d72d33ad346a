"""backhaul-agent: the workstation side. Dials out to the VPS and keeps a reverse forward alive."""
