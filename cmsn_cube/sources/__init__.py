"""Where cubes come from: Earth Engine (xee), the embedded synthetic scene, seed-style GeoTIFFs."""
