"""Benchmarks of expertmesh, alone and side by side with its peers: `python -m benchmarks`.

The scripts beside this file also run on their own (`python benchmarks/deployments.py`).
"""
