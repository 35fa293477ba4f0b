"""Cluster simulator, roofline bound and planner: predicts a plan (ModelConfig + Deployment +
Workload) on a cluster of GPUs, calibrated against real runs of the engine."""

from expertmesh.sim.bound import Bound, roofline
from expertmesh.sim.hardware import CATALOGUE, HardwareProfile, get_profile
from expertmesh.sim.routing import Routing
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import SimResult, simulate
from expertmesh.topology import Topology

__all__ = ["CATALOGUE", "Bound", "HardwareProfile", "Routing", "Scenario", "SimResult", "Topology",
           "get_profile", "roofline", "simulate"]
