"""Adapting a trained model to a new place without its labels (``buildseg adapt``).

* ``pseudo_labels.py``: which teacher pixels become targets (confident ones) and which are ignored;
* ``batchnorm.py``: batch-norm statistics re-estimated on the target imagery;
* ``target_data.py``: random crops of the target's pixels (never its masks);
* ``settings.py``: every setting of a run and its default (the CLI's flags);
* ``loop.py``: the self-training loop (EMA teacher, strongly augmented student), its
  checkpoints, resume and time limit.
"""
