"""The pretend accelerator of the tests: `expertmesh/pretend_device.py` (where `expertmesh
profile` counts a CPU run's host reads with it too)."""

from expertmesh.pretend_device import DEVICE, FakeDevice, MixedDevices, OnDevice, move_to_device, to_host

__all__ = ["DEVICE", "FakeDevice", "MixedDevices", "OnDevice", "move_to_device", "to_host"]
