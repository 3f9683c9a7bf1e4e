"""What training and inference share and neither owns: the device and precision choice
(``device.py``) and checkpoint I/O (``checkpoint.py``). Imports neither training nor inference."""
