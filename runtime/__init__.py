"""Device-side runtime: bundles, engines, error map, growth (never imports export)."""
