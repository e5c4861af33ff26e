"""deetune: eBPF-based, non-intrusive network observability.

Probes (BPF programs loaded through libbpf), protocol decoders and sinks are
pluggy plugins; a :class:`~deetune.pipeline.Pipeline` wires them together.
"""

__version__ = "0.1.0"
