"""Building footprints as vectors: polygons from masks, seams, simplification, GIS writers."""
