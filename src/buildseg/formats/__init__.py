"""File formats: competition RLE, competition CSV tables, images."""
