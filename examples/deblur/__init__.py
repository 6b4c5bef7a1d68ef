"""Helper modules of the DE-GRAD deblurring example (``examples/deblur_celeba.py``).

One idea per module:

* :mod:`deblur.config`: presets, the plain-dict run configuration and its validation.
* :mod:`deblur.cli`: the argparse command line.
* :mod:`deblur.data`: CelebA folders (Pillow), built-in scikit-image photographs, splits.
* :mod:`deblur.model`: the blur operator, the residual DnCNN denoiser and the DE-GRAD DEQ.
* :mod:`deblur.measure`: simulated measurements with per-image reproducible noise.
* :mod:`deblur.checkpoint`: atomic checkpoints that load with ``weights_only=True``.
* :mod:`deblur.distributed`: ``torchrun`` / DistributedDataParallel helpers.
* :mod:`deblur.training`: denoiser pretraining, JFB training, resume and Ctrl-C handling.
* :mod:`deblur.evaluation`: metrics on the test split, the iteration-budget sweep, tables.
* :mod:`deblur.figures`: the PNG figures (matplotlib, Agg backend).
* :mod:`deblur.restore`: deblurring a user's image file with a trained checkpoint.
"""
