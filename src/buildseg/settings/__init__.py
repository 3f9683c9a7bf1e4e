"""Every command's settings, declared once: defaults, help, choices, ranges and the rules
between fields. The CLI's flags and ``docs/cli.md``'s tables are generated from them; the
library's jobs take them. Imports nothing heavy (no torch, no GDAL)."""
