"""Probes: BPF programs and the decoding of what they report."""

from deetune.probes.base import Clock, Probe, ProbeOptions

__all__ = ["Clock", "Probe", "ProbeOptions"]
