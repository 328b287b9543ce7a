"""Device profiles and the memory planner (installed as edge_mmm.devices)."""

from .detect import DetectedDevice, detect
from .planner import DevicePlan, PlanItem, PlanRequest, check_fits, cheapest_fix, plan
from .profile import DeviceProfile, get_profile, list_profiles, load_profile

__all__ = ["DeviceProfile", "load_profile", "list_profiles", "get_profile", "DetectedDevice", "detect",
           "PlanRequest", "PlanItem", "DevicePlan", "plan", "check_fits", "cheapest_fix"]
