"""Data: datasets over competition records, augmentation, synthetic demo scenes."""
