"""Data: OASST1 message trees -> best conversation paths, LIMA, prompt formats, labels, packing."""
