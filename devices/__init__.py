"""Device profiles and the memory planner (installed as edge_mmm.devices)."""
