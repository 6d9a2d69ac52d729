"""Cuneiform archiver: raw event segments, rebuild, retention, dataset export."""
