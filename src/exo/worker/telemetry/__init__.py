"""Device and link telemetry: inventory, metrics, change detection, link probes."""
