"""What drives the core over files: tiles and CSVs, GeoTIFF blocks, many scenes, tuning,
quantisation, export. Imports the core, never a runner."""
